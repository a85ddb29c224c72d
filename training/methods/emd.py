"""EM Distillation (Xie et al., NeurIPS 2024, arXiv 2405.16852), implemented from the paper.

The generator x = g(z) = D_theta(sigma_g z, sigma_g) is a latent-variable model; distillation maximises
the likelihood of the teacher's x_t-marginal under it with an EM loop at a noise level sigma (VE form,
x_t = x + sigma eps, alpha_t = 1):
- fake score D_psi: EDM denoising score matching on generator samples (shared with SiD);
- E-step (Sec. 3, reparametrised sampling): K Langevin steps on (eps, z), x_t = g(z) + sigma eps, whose
  target is the teacher's x_t-marginal joined with the generator's posterior over z. With the score
  difference Delta = (D_T(x_t) - D_psi(x_t)) / sigma^2 (teacher score minus the generator's own score),
      grad_eps log rho = sigma Delta - eps,      grad_z log rho = J_g(z)^T Delta - z,
      eps <- eps + g_eps grad_eps + sqrt(2 g_eps) n_eps,   z <- z + g_z grad_z + sqrt(2 g_z) n_z;
- noise cancellation (Sec. 3): the Gaussian noise the chain carries (the initial eps and every injected
  n_eps; every injected n_z) is tracked through the linear part of the update, nu <- (1 - g) nu + sqrt(2g) n,
  and removed from the final state, so that what is left is exactly the accumulated drift;
- M-step: maximise log p_theta(x_t | z) = -|x_t - g_theta(z)|^2 / (2 sigma^2) at the corrected sample, i.e.
  regress g_theta(z_K) onto x* = g(z_K) + sigma d_K, d_K the noise-cancelled eps displacement, with the
  per-sample stop-gradient weight 1 / mean|g - D_T| of DMD / Diff-Instruct taken at the chain's start.
Relation to mode-seeking KL (Sec. 3): one Langevin step on eps alone (K = 1, g_eps = 1, g_z = 0) with
noise cancellation gives d_1 = sigma Delta, so the M-step gradient is E[w (D_psi - D_T)^T dg/dtheta], the
Diff-Instruct / VSD gradient (tests/test_emd.py checks it). K = 0 gives no update at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from onestep.config import OptimConfig
from training.methods.sid import SiD, SiDConfig


@dataclass(frozen=True)
class EMDConfig:
    K: int = 16  # Langevin steps in the E-step (EMD-16)
    step_eps: float = 0.2  # Langevin step size on eps
    step_z: float = 0.005  # Langevin step size on z
    noise_cancellation: bool = True
    vsd_term: bool = False  # also add D_T - D_psi at the final state to the M-step target (K = 0 is then VSD)
    noise_levels: str = "vp"  # 'vp': t ~ U[vp_t] on the VP schedule; 'karras': SiD's grid t ~ U[0, t_max/1000]
    vp_t: tuple[float, float] = (0.02, 0.98)
    t_max: float = 800.0  # for noise_levels='karras'
    sigma_init: float = 2.5
    P_mean: float = -1.2
    P_std: float = 1.2
    fake_warmup: int = 0
    # noise levels of the fake score's denoising score matching: 'edm' the teacher's training draw (ln sigma ~
    # N(P_mean, P_std^2), as SiD); 'm_step' the E/M-step's draw above, as DMD and Diff-Instruct train their fake
    # score, so that D_psi is trained where the E-step queries it (the VP draw puts ~a third of sigma above 10, where
    # the EDM draw puts ~0.2%)
    fake_noise_levels: str = "edm"
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))
    optim_fake: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))


class Chain(NamedTuple):
    """The E-step's result: final latent, noise-cancelled eps displacement d_K, final eps with the injected
    noise removed (the initial eps kept), and the M-step weight taken at the chain's start."""

    z: torch.Tensor
    disp: torch.Tensor
    eps: torch.Tensor
    weight: torch.Tensor


def vp_sigma(t: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """sigma(t) of the VP SDE (Song et al. 2021; EDM Table 1): sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


class EMD(SiD):
    name = "emd"

    @classmethod
    def needs_for(cls, cfg) -> tuple[str, ...]:
        return ("teacher",)

    def __init__(self, cfg: EMDConfig, teacher, data=None):
        if cfg.noise_levels not in ("vp", "karras"):
            raise ValueError(f"noise_levels must be 'vp' or 'karras', got {cfg.noise_levels!r}")
        if cfg.fake_noise_levels not in ("edm", "m_step"):
            raise ValueError(f"fake_noise_levels must be 'edm' or 'm_step', got {cfg.fake_noise_levels!r}")
        sid_cfg = SiDConfig(sigma_init=cfg.sigma_init, t_max=cfg.t_max, P_mean=cfg.P_mean, P_std=cfg.P_std,
                            fake_warmup=cfg.fake_warmup, optim_generator=cfg.optim_generator,
                            optim_fake=cfg.optim_fake)
        super().__init__(sid_cfg, teacher)
        self.name = "emd"
        self.emd_cfg = cfg

    def config_dict(self) -> dict:
        from onestep.config import to_dict

        return to_dict(self.emd_cfg)

    def _denoise(self, x_t, sigma, labels, fake: bool = True):
        with torch.no_grad():
            d_T = self.teacher(x_t, sigma, labels).float()
            return d_T, (self.trainable["fake"](x_t, sigma, labels).float() if fake else None)

    @staticmethod
    def _weight(x, d_T):
        """DMD / Diff-Instruct's per-sample normaliser 1 / mean|x - D_T(x_t)| (stop-gradient)."""
        return 1.0 / (x.detach() - d_T).abs().flatten(1).mean(1).clamp_min(1e-5).reshape(-1, 1, 1, 1)

    def e_step(self, z, eps, sigma, labels, K: int | None = None, noise_cancellation: bool | None = None,
               step_eps: float | None = None, step_z: float | None = None) -> Chain:
        """K Langevin steps on (eps, z) (EMD Sec. 3, reparametrised sampling)."""
        cfg = self.emd_cfg
        K = cfg.K if K is None else K
        nc = cfg.noise_cancellation if noise_cancellation is None else noise_cancellation
        ge = cfg.step_eps if step_eps is None else step_eps
        gz = cfg.step_z if step_z is None else step_z
        g = self.trainable["generator"]
        s = sigma.reshape(-1, 1, 1, 1)
        eps0, z = eps, z.detach()
        nu_eps = torch.zeros_like(eps)  # injected eps-noise carried to the current state
        nu_z = torch.zeros_like(z)  # injected z-noise carried to the current state
        weight = None
        for _ in range(K):
            z_req = z.requires_grad_(gz > 0)
            with torch.set_grad_enabled(gz > 0):
                x = g(z_req, labels).float()
                x_t = x.detach() + s * eps
                d_T, d_psi = self._denoise(x_t, sigma, labels)
                delta = (d_T - d_psi) / s**2  # teacher score minus fake score at x_t
                jt_delta = torch.autograd.grad(x, z_req, grad_outputs=delta)[0] if gz > 0 else None
            if weight is None:
                weight = self._weight(x, d_T)
            xi_e = torch.randn_like(eps)
            eps = eps + ge * (s * delta - eps) + (2 * ge) ** 0.5 * xi_e
            nu_eps = (1 - ge) * nu_eps + (2 * ge) ** 0.5 * xi_e
            if gz > 0:
                xi_z = torch.randn_like(z)
                z = z.detach() + gz * (jt_delta - z.detach()) + (2 * gz) ** 0.5 * xi_z
                nu_z = (1 - gz) * nu_z + (2 * gz) ** 0.5 * xi_z
            z = z.detach()
        if weight is None:  # K = 0: the weight at the generator sample itself
            with torch.no_grad():
                x = g(z, labels).float()
            weight = self._weight(x, self._denoise(x + s * eps, sigma, labels, fake=False)[0])
        if nc:
            # eps_K = (1 - g)^K eps_0 + nu_eps + drift: remove the initial eps and the injected noise
            disp = eps - (1 - ge) ** K * eps0 - nu_eps
            eps, z = eps - nu_eps, z - nu_z
        else:
            disp = eps - eps0
        return Chain(z.detach(), disp.detach(), eps.detach(), weight.detach())

    def step(self, batch, it, phase):
        if phase == "fake":
            return super().step(batch, it, phase)
        labels = batch["labels"]
        dev = self.device_of()
        z = self.noise(batch["n"], dev)
        sigma = self._m_sigma(batch["n"], dev)
        eps = torch.randn(batch["n"], *self.image_shape, device=dev)
        return self.m_step_loss(self.e_step(z, eps, sigma, labels), sigma, labels)

    def m_step_loss(self, chain: Chain, sigma, labels):
        """-w log p_theta(x* | z_K) up to a constant: 0.5 w |g_theta(z_K) - sg(x*)|^2, x* = g(z_K) + sigma d_K
        (EMD M-step; the 1 / sigma^2 of the Gaussian likelihood is absorbed into the weight)."""
        s = sigma.reshape(-1, 1, 1, 1)
        x = self.trainable["generator"](chain.z, labels).float()
        target = x.detach() + s * chain.disp
        if self.emd_cfg.vsd_term:
            d_T, d_psi = self._denoise(x.detach() + s * chain.eps, sigma, labels)
            target = target + (d_T - d_psi)
        loss = 0.5 * (chain.weight * (x - target) ** 2).flatten(1).sum(1).mean()
        return {"loss": loss, "drift_norm": (target - x.detach()).flatten(1).norm(dim=1).mean()}

    def _fake_sigma(self, n, device):
        return self._m_sigma(n, device) if self.emd_cfg.fake_noise_levels == "m_step" else super()._fake_sigma(n, device)

    def _m_sigma(self, n, device):
        if self.emd_cfg.noise_levels == "karras":
            return self._gen_sigma(n, device)
        lo, hi = self.emd_cfg.vp_t
        t = lo + (hi - lo) * torch.rand(n, device=device)
        return vp_sigma(t).clamp(self.sigma_min, self.sigma_max)

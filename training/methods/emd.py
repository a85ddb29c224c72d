"""EM Distillation (Xie et al., NeurIPS 2024, arXiv 2405.16852), implemented from the paper.

The generator x = g(z) = D_theta(sigma_g z, sigma_g) is a latent-variable model; distillation maximises
the likelihood of the teacher's x_t-marginal under it with an EM loop at a noise level sigma (VE form,
x_t = x + sigma eps):
- fake score D_psi: EDM denoising score matching on generator samples (shared with SiD);
- E-step: K Langevin steps on the reparametrised pair (eps, z), x_t = g(z) + sigma eps, targeting the
  teacher's x_t-marginal joined with the generator's posterior over z. The drift needs the score
  difference Delta = (D_T(x_t) - D_psi(x_t)) / sigma^2 (teacher score minus the generator's own score):
      eps <- eps + g_eps (sigma Delta - eps) + sqrt(2 g_eps) n_eps,
      z   <- z   + g_z (J_g(z)^T Delta - z)   + sqrt(2 g_z) n_z;
- noise cancellation: the injected noises (and the initial eps) are accumulated and removed from the final
  state, which keeps only the drift and removes most of the gradient variance;
- M-step: regress g_theta(z_K) onto the corrected sample
      x* = g(z_K) + sigma (eps_K - eps_0 - N_eps) + (D_T(x_t,K) - D_psi(x_t,K)),
  weighted per sample by 1 / mean|g - D_T| (stop-gradient).
With K = 0 the target is g(z) + D_T(x_t) - D_psi(x_t) and the M-step gradient is exactly the
Diff-Instruct / VSD reverse-KL gradient E[w (D_psi - D_T)^T dg/dtheta] (tests/test_emd.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onestep.config import OptimConfig
from training.methods.sid import SiD, SiDConfig


@dataclass(frozen=True)
class EMDConfig:
    K: int = 4  # Langevin steps in the E-step (0 = Diff-Instruct / VSD)
    step_eps: float = 0.2
    step_z: float = 0.005
    noise_cancellation: bool = True
    sigma_init: float = 2.5
    t_max: float = 800.0
    P_mean: float = -1.2
    P_std: float = 1.2
    fake_warmup: int = 50
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))
    optim_fake: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))


class EMD(SiD):
    name = "emd"

    @classmethod
    def needs_for(cls, cfg) -> tuple[str, ...]:
        return ("teacher",)

    def __init__(self, cfg: EMDConfig, teacher, data=None):
        sid_cfg = SiDConfig(sigma_init=cfg.sigma_init, t_max=cfg.t_max, P_mean=cfg.P_mean, P_std=cfg.P_std,
                            fake_warmup=cfg.fake_warmup, optim_generator=cfg.optim_generator,
                            optim_fake=cfg.optim_fake)
        super().__init__(sid_cfg, teacher)
        self.name = "emd"
        self.emd_cfg = cfg

    def config_dict(self) -> dict:
        from onestep.config import to_dict

        return to_dict(self.emd_cfg)

    def _score_diff(self, x_t, sigma, labels):
        with torch.no_grad():
            return self.teacher(x_t, sigma, labels).float(), self.trainable["fake"](x_t, sigma, labels).float()

    def e_step(self, z, eps, sigma, labels, K: int | None = None, noise_cancellation: bool | None = None):
        """K Langevin steps on (eps, z); returns (z_final, eps displacement, x_t at the final state)."""
        cfg = self.emd_cfg
        K = cfg.K if K is None else K
        nc = cfg.noise_cancellation if noise_cancellation is None else noise_cancellation
        g = self.trainable["generator"]
        s = sigma.reshape(-1, 1, 1, 1)
        eps0 = eps
        n_eps = torch.zeros_like(eps)
        n_z = torch.zeros_like(z)
        for _ in range(K):
            z_req = z.detach().requires_grad_(True)
            with torch.enable_grad():
                x = g(z_req, labels)
                x_t = x + s * eps
                d_T, d_psi = self._score_diff(x_t.detach(), sigma, labels)
                delta = (d_T - d_psi) / s**2
                (jt_delta,) = torch.autograd.grad(x, z_req, grad_outputs=delta)
            xi_e, xi_z = torch.randn_like(eps), torch.randn_like(z)
            eps = eps + cfg.step_eps * (s * delta - eps) + (2 * cfg.step_eps) ** 0.5 * xi_e
            z = z.detach() + cfg.step_z * (jt_delta - z.detach()) + (2 * cfg.step_z) ** 0.5 * xi_z
            n_eps = n_eps + (2 * cfg.step_eps) ** 0.5 * xi_e
            n_z = n_z + (2 * cfg.step_z) ** 0.5 * xi_z
        if nc:  # remove the injected noise from the final state (and the initial eps from the displacement)
            z = z - n_z
            disp = eps - eps0 - n_eps
            eps = eps - n_eps
        else:
            disp = eps - eps0
        return z.detach(), disp.detach(), eps.detach()

    def step(self, batch, it, phase):
        if phase == "fake":
            return super().step(batch, it, phase)
        labels = batch["labels"]
        dev = self.device_of()
        z = self.noise(batch["n"], dev)
        sigma = self._gen_sigma(batch["n"], dev)
        eps = torch.randn(batch["n"], *self.image_shape, device=dev)
        z_k, disp, eps_k = self.e_step(z, eps, sigma, labels)
        return self.m_step_loss(z_k, disp, eps_k, sigma, labels)

    def m_step_loss(self, z_k, disp, eps_k, sigma, labels):
        s = sigma.reshape(-1, 1, 1, 1)
        x = self.trainable["generator"](z_k, labels)
        x_t = x.detach() + s * eps_k
        d_T, d_psi = self._score_diff(x_t, sigma, labels)
        target = x.detach() + s * disp + (d_T - d_psi)
        w = 1.0 / (x.detach() - d_T).abs().flatten(1).mean(1).clamp_min(1e-8).reshape(-1, 1, 1, 1)
        loss = 0.5 * (w * (x.float() - target) ** 2).flatten(1).sum(1).mean()
        return {"loss": loss, "drift_norm": (target - x.detach()).flatten(1).norm(dim=1).mean()}

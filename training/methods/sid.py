"""SiD (Zhou et al. 2024, arXiv 2404.04057) and SiDA (Zhou et al. 2024, arXiv 2410.14919).

Three nets, all copies of the teacher at start: the frozen teacher f_phi, a fake score f_psi and the
generator G(z) = D_theta(sigma_init z, sigma_init) with sigma_init = 2.5.
Every iteration: one fake-score step, then one generator step (SiD Algorithm 1).
- fake-score step: EDM denoising loss on generated images, ln sigma ~ N(P_mean, P_std^2), weight
  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (SiD Eq. 9 with EDM's weighting);
- generator step: x_t = G(z) + sigma n with t ~ U[0, t_max/1000] on the Karras grid;
  per-pixel loss (f_phi(x_t) - f_psi(x_t)) * ((f_phi(x_t) - x_g) - alpha (f_phi(x_t) - f_psi(x_t))),
  divided by the stop-gradient per-sample scale mean|x_g - f_phi(x_t)|, summed over pixels
  (SiD Eq. 13/14 with alpha = 1.2; SiDA uses alpha = 1.0).
- SiDA (Sec. 3): the fake score's encoder output (mean over channels: a map of logits) doubles as a
  discriminator between real and generated images noised with the SAME sigma and noise as the fake-score
  step; its loss lambda(sigma) (BCE_real + BCE_fake) / 2 is added to the fake score's DSM loss (weight
  lambda_d against the pixel-summed DSM). The generator's adversarial term is the batch-mean non-saturating
  BCE of the logits of its own noised sample x_t, divided by the same per-sample scale as the SiD term and
  multiplied by the pixel count, weighted lambda_adv against lambda_sid for the SiD term. Until the mix-in
  point the generator trains on SiD alone; after it on 0.5 SiD + 0.5 GAN.
The SiD loss can be negative and does not show convergence: watch the sample metric instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from onestep.config import OptimConfig
from onestep.denoiser import raw_network
from training.methods.common import GeneratorMethod, edm_sigma, edm_weight, karras_sigma_at


@dataclass(frozen=True)
class SiDConfig:
    alpha: float = 1.2
    sigma_init: float = 2.5
    t_max: float = 800.0  # of 1000: sigma <= ~24 for sigma_max = 80
    P_mean: float = -1.2
    P_std: float = 1.2
    fake_warmup: int = 0  # iterations of fake-score (and discriminator) training before the generator steps
    adversarial: bool = False  # SiDA
    lambda_sid: float = 100.0  # weight of the pixel-summed SiD term (only lambda_adv / lambda_sid matters)
    lambda_adv: float = 0.01  # weight of the generator's GAN term per pixel (SiDA)
    lambda_d: float = 1.0  # weight of the discriminator loss against the pixel-summed DSM loss (SiDA)
    adv_mix_after: int = 0  # generator iterations on SiD alone before 0.5 * SiD + 0.5 * GAN (SiDA)
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))
    # continue from this one-step generator checkpoint instead of the teacher copy (the fake score still starts
    # as the teacher: give it fake_warmup iterations to catch up with the loaded generator first)
    init_from: str | None = None
    optim_fake: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))


def sid_generator_loss(x_g: torch.Tensor, f_phi: torch.Tensor, f_psi: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss per sample (SiD Eq. 14): sum over pixels of
    (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) / sg(mean|x_g - f_phi|)."""
    scale = sid_scale(x_g, f_phi)
    per_pixel = (f_phi - f_psi) * ((f_phi - x_g) - alpha * (f_phi - f_psi)) / scale
    return torch.nan_to_num(per_pixel).flatten(1).sum(1)


def sid_scale(x_g: torch.Tensor, f_phi: torch.Tensor) -> torch.Tensor:
    """The stop-gradient per-sample normaliser mean|x_g - f_phi(x_t)| (SiD Eq. 14), shape (N, 1, 1, 1)."""
    return (x_g.detach() - f_phi.detach()).abs().flatten(1).mean(1).clamp_min(1e-5).reshape(-1, 1, 1, 1)


class SiD(GeneratorMethod):
    name = "sid"
    needs = ("teacher",)

    @classmethod
    def needs_for(cls, cfg) -> tuple[str, ...]:
        return ("teacher", "data") if cfg.adversarial else ("teacher",)

    def __init__(self, cfg: SiDConfig, teacher, data=None):
        super().__init__(cfg, teacher, cfg.sigma_init)
        self.name = "sida" if cfg.adversarial else "sid"
        if cfg.init_from:
            self.init_report = self.warm_start_generator(cfg.init_from)
        fake = self.trainable_copy(teacher)
        self.trainable["fake"] = fake
        self.data = data if cfg.adversarial else None
        self._encoder_out = None
        if cfg.adversarial:
            if data is None:
                raise ValueError("SiDA needs real images (data)")
            # the encoder's output is the last down block's hidden state (before the middle blocks)
            raw_network(fake).down_blocks[-1].register_forward_hook(self._grab)

    def _grab(self, module, inputs, output):
        self._encoder_out = output[0] if isinstance(output, tuple) else output

    def optim_config(self, name):
        return self.cfg.optim_generator if name == "generator" else self.cfg.optim_fake

    def phases(self, it):
        return ["fake"] if it < self.cfg.fake_warmup else ["fake", "generator"]

    def _generate(self, batch, grad: bool):
        z = self.noise(batch["n"], self.device_of())
        with torch.set_grad_enabled(grad):
            return self.trainable["generator"](z, batch["labels"])

    def device_of(self):
        return next(self.trainable["generator"].parameters()).device

    def fake_with_logits(self, x_t, sigma, labels):
        """One pass of the fake score: its denoised output and the discriminator logits (SiDA Sec. 3: the
        encoder output averaged over channels, one logit per position)."""
        out = self.trainable["fake"](x_t, sigma, labels)
        return out.float(), self._encoder_out.float().mean(1).flatten(1)

    def step(self, batch, it, phase):
        labels = batch["labels"]
        if phase == "fake":
            x_g = self._generate(batch, grad=False).detach()
            sigma = self._fake_sigma(len(x_g), x_g.device)
            s = sigma.reshape(-1, 1, 1, 1)
            n = torch.randn_like(x_g) * s
            weight = edm_weight(s, self.sigma_data)
            if not self.cfg.adversarial:
                out = self.trainable["fake"](x_g + n, sigma, labels).float()
                dsm = (weight * (out - x_g) ** 2).flatten(1).mean(1).mean()
                return {"loss": dsm, "dsm": dsm}
            out, l_fake = self.fake_with_logits(x_g + n, sigma, labels)
            dsm = (weight * (out - x_g) ** 2).flatten(1).mean(1).mean()
            _, l_real = self.fake_with_logits(batch["x"] + n, sigma, labels)  # same sigma and noise as the fake
            # SiDA: lambda(sigma) (BCE(real, 1) + BCE(fake, 0)) / 2, each BCE a mean over the batch's logits
            d_loss = weight.flatten().mean() * (F.softplus(-l_real).mean() + F.softplus(l_fake).mean()) / 2
            pix = x_g[0].numel()  # the DSM above is a per-pixel MEAN; lambda_d weighs d_loss against the SUM
            return {"loss": dsm + self.cfg.lambda_d * d_loss / pix, "dsm": dsm, "d_loss": d_loss,
                    "d_real_acc": (l_real > 0).float().mean(), "d_fake_acc": (l_fake < 0).float().mean()}
        # generator step
        x_g = self._generate(batch, grad=True)
        sigma = self._gen_sigma(len(x_g), x_g.device)
        x_t = x_g + torch.randn_like(x_g) * sigma.reshape(-1, 1, 1, 1)
        f_phi = self.teacher(x_t, sigma, labels).float()
        if not self.cfg.adversarial:
            f_psi = self.trainable["fake"](x_t, sigma, labels).float()
            sid = sid_generator_loss(x_g.float(), f_phi, f_psi, self.cfg.alpha).mean()
            return {"loss": sid, "sid": sid}
        f_psi, logits = self.fake_with_logits(x_t, sigma, labels)
        sid = sid_generator_loss(x_g.float(), f_phi, f_psi, self.cfg.alpha).mean()
        # SiDA: batch-mean non-saturating BCE (logits clamped to [-10, 10]), divided per sample by SiD's scale,
        # times the pixel count; weight lambda_adv against lambda_sid for the pixel-summed SiD term
        bce = F.softplus(-logits.clamp(-10, 10)).mean()
        gan = (bce / sid_scale(x_g, f_phi).flatten()).mean() * x_g[0].numel()
        gan_w = (self.cfg.lambda_adv / self.cfg.lambda_sid) * gan
        mixed = it >= self.cfg.fake_warmup + self.cfg.adv_mix_after
        return {"loss": 0.5 * sid + 0.5 * gan_w if mixed else sid, "sid": sid, "gan": bce,
                "gan_weighted": gan_w}

    def _fake_sigma(self, n, device):
        """Noise levels of the fake score's denoising score matching: the teacher's training draw (EDM Table 1)."""
        return edm_sigma(n, device, self.cfg.P_mean, self.cfg.P_std)

    def _gen_sigma(self, n, device):
        t = torch.rand(n, device=device) * (self.cfg.t_max / 1000.0)
        return karras_sigma_at(t, self.sigma_min, self.sigma_max)

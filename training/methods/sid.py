"""SiD (Zhou et al. 2024, arXiv 2404.04057) and SiDA (Zhou et al. 2024, arXiv 2410.14919).

Three nets, all copies of the teacher at start: the frozen teacher f_phi, a fake score f_psi and the
generator G(z) = D_theta(sigma_init z, sigma_init) with sigma_init = 2.5.
- fake-score step: EDM denoising loss on generated images (ln sigma ~ N(-1.2, 1.2^2), EDM weighting);
- generator step: x_t = G(z) + sigma n with sigma on the Karras grid, t ~ U[0, t_max/1000];
  per-pixel loss (f_phi(x_t) - f_psi(x_t)) * ((f_phi(x_t) - x_g) - alpha (f_phi(x_t) - f_psi(x_t))),
  divided by the stop-gradient per-sample scale mean|x_g - f_phi(x_t)|, summed over pixels
  (SiD Eq. 13 with alpha = 1.2; SiDA uses alpha = 1.0).
- SiDA: the fake score's encoder (UNet bottleneck, mean over channels -> a map of logits) doubles as a
  discriminator between noised real and noised generated images; non-saturating losses. The generator adds
  its GAN term weighted by lambda_adv * (pixels per image) and after the warm-up mixes 0.5 SiD + 0.5 GAN.
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
    fake_warmup: int = 50  # iterations of fake-score training before the generator starts
    adversarial: bool = False  # SiDA
    lambda_adv: float = 0.01  # GAN weight per pixel (SiDA)
    adv_mix_after: int = 0  # after this many generator iterations: 0.5 * SiD + 0.5 * GAN (SiDA)
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))
    optim_fake: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))


class SiD(GeneratorMethod):
    name = "sid"
    needs = ("teacher",)

    @classmethod
    def needs_for(cls, cfg) -> tuple[str, ...]:
        return ("teacher", "data") if cfg.adversarial else ("teacher",)

    def __init__(self, cfg: SiDConfig, teacher, data=None):
        super().__init__(cfg, teacher, cfg.sigma_init)
        self.name = "sida" if cfg.adversarial else "sid"
        fake = self.trainable_copy(teacher)
        self.trainable["fake"] = fake
        self.data = data if cfg.adversarial else None
        self._bottleneck = None
        if cfg.adversarial:
            if data is None:
                raise ValueError("SiDA needs real images (data)")
            raw_network(fake).mid_block.register_forward_hook(self._grab)

    def _grab(self, module, inputs, output):
        self._bottleneck = output

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

    def _logits(self, x_t, sigma, labels):
        """Discriminator logits from the fake score's encoder: bottleneck mean over channels, one per position."""
        self.trainable["fake"](x_t, sigma, labels)
        return self._bottleneck.float().mean(1).flatten(1)

    def step(self, batch, it, phase):
        labels = batch["labels"]
        if phase == "fake":
            x_g = self._generate(batch, grad=False).detach()
            sigma = edm_sigma(len(x_g), x_g.device, self.cfg.P_mean, self.cfg.P_std)
            s = sigma.reshape(-1, 1, 1, 1)
            x_t = x_g + torch.randn_like(x_g) * s
            out = self.trainable["fake"](x_t, sigma, labels)
            dsm = (edm_weight(s, self.sigma_data) * (out.float() - x_g) ** 2).flatten(1).mean(1).mean()
            losses = {"loss": dsm, "dsm": dsm}
            if self.cfg.adversarial:
                sig_d = self._gen_sigma(len(x_g), x_g.device).reshape(-1, 1, 1, 1)
                real = batch["x"]
                l_real = self._logits(real + torch.randn_like(real) * sig_d, sig_d.flatten(), labels)
                l_fake = self._logits(x_g + torch.randn_like(x_g) * sig_d, sig_d.flatten(), labels)
                d_loss = (F.softplus(-l_real).mean(1) + F.softplus(l_fake).mean(1)).mean()
                # DSM above is a per-pixel MEAN, so "lambda_adv per pixel" is lambda_adv * d_loss here
                losses.update(loss=dsm + self.cfg.lambda_adv * d_loss, d_loss=d_loss,
                              d_real_acc=(l_real > 0).float().mean(), d_fake_acc=(l_fake < 0).float().mean())
            return losses
        # generator step
        x_g = self._generate(batch, grad=True)
        sigma = self._gen_sigma(len(x_g), x_g.device)
        s = sigma.reshape(-1, 1, 1, 1)
        x_t = x_g + torch.randn_like(x_g) * s
        f_phi = self.teacher(x_t, sigma, labels).float()
        f_psi = self.trainable["fake"](x_t, sigma, labels).float()
        scale = (x_g.detach() - f_phi.detach()).abs().flatten(1).mean(1).clamp_min(1e-8).reshape(-1, 1, 1, 1)
        per_pixel = (f_phi - f_psi) * ((f_phi - x_g) - self.cfg.alpha * (f_phi - f_psi)) / scale
        sid = torch.nan_to_num(per_pixel).flatten(1).sum(1).mean()
        losses = {"sid": sid}
        if self.cfg.adversarial:
            pix = x_g[0].numel()
            logits = self._logits(x_t, sigma, labels)
            gan = F.softplus(-logits).mean(1).mean()
            gan_w = self.cfg.lambda_adv * pix * gan  # SiD above is a per-pixel SUM: weight lambda_adv per pixel
            mixed = it >= self.cfg.fake_warmup + self.cfg.adv_mix_after
            losses.update(loss=0.5 * sid + 0.5 * gan_w if mixed else sid + gan_w, gan=gan)
        else:
            losses["loss"] = sid
        return losses

    def _gen_sigma(self, n, device):
        t = torch.rand(n, device=device) * (self.cfg.t_max / 1000.0)
        return karras_sigma_at(t, self.sigma_min, self.sigma_max)

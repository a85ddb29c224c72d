"""One interface for every network: D(x, sigma, labels) -> x0_hat (EDM notation, Karras et al. 2022).

- `EDMDenoiser` wraps a raw net F with EDM preconditioning (Eq. 7 and Table 1).
- `DiffusersEpsDenoiser` adapts a diffusers DDPM/DDIM model (eps-, v- or sample-prediction).
- `OneStepGenerator` is a student: G(z, labels) = D(sigma_g * z, sigma_g, labels).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn


def _sigma_vector(sigma, x: torch.Tensor) -> torch.Tensor:
    """float | 0-d | (1,) | (B,) tensor -> (B,) tensor on x's device/dtype."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        return s.expand(x.shape[0])
    s = s.reshape(-1)
    if s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {s.shape[0]} entries for a batch of {x.shape[0]}")
    return s


def _check_labels(labels, x: torch.Tensor, num_classes: int):
    if num_classes <= 0:
        return None
    if labels is None:
        raise ValueError(f"this model is class-conditional ({num_classes} classes): pass labels")
    labels = torch.as_tensor(labels, device=x.device).long()
    labels = labels.expand(x.shape[0]) if labels.ndim == 0 else labels.reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {x.shape[0]}")
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not _exporting() and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{lo}, {hi}]")
    return labels


def _exporting() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:  # pragma: no cover
        return False


def raw_network(denoiser: nn.Module) -> nn.Module:
    """The raw network F inside a denoiser (the diffusers UNet2DModel), whatever the wrapper: EDMDenoiser keeps
    it as `.net`, DiffusersEpsDenoiser as `.unet`; a OneStepGenerator is unwrapped first. Methods that hook the
    network's layers (SiDA's discriminator, SFERD's attention maps) go through this one door."""
    while isinstance(denoiser, OneStepGenerator):
        denoiser = denoiser.denoiser
    for attr in ("net", "unet"):
        net = getattr(denoiser, attr, None)
        if isinstance(net, nn.Module):
            return net
    raise TypeError(f"{type(denoiser).__name__} exposes no raw network (.net or .unet)")


class EDMDenoiser(nn.Module):
    """D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)); EDM Eq. 7, Table 1."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, num_classes: int = 0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.num_classes = int(num_classes)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        labels = _check_labels(labels, x, self.num_classes)
        sd = self.sigma_data
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)  # Table 1: c_skip
        c_out = s * sd / (s**2 + sd**2).sqrt()  # Table 1: c_out
        c_in = 1 / (s**2 + sd**2).sqrt()  # Table 1: c_in
        c_noise = sigma.log() / 4  # Table 1: c_noise
        F_x = self.net((c_in * x).to(x.dtype), c_noise.to(x.dtype), class_labels=labels).sample
        return (c_skip * x + c_out * F_x.to(torch.float32)).to(x.dtype)


class DiffusersEpsDenoiser(nn.Module):
    """A diffusers DDPM/DDIM UNet2DModel + its scheduler's alphas_cumprod, seen as an EDM denoiser.

    VP <-> VE (Karras et al. 2022, Sec. 2 and App. C.1): sigma = sqrt((1 - abar) / abar), x_vp = x / sqrt(1 + sigma^2),
    so alpha = sqrt(abar) = 1 / sqrt(1 + sigma^2) and sigma_vp = sqrt(1 - abar) = 1 / sqrt(1 + 1 / sigma^2).
    x0_hat per prediction type:
      epsilon:       x0_hat = x - sigma * eps_hat                       (x = x0 + sigma eps)
      v_prediction:  x0_hat = alpha * x_vp - sigma_vp * v_hat           (v = alpha eps - sigma_vp x0)
      sample:        x0_hat = F(x_vp, t)
    The network's timestep for a sigma between training levels is interpolated linearly in log-sigma; a UNet with a
    learned (table) time embedding instead gets the nearest training level t, and that level's sigma is used in
    every formula above. Learned-variance UNets (2C output channels) contribute their first C channels.

    Zero terminal SNR (abar_{T-1} = 0, Lin et al. 2024): sigma_{T-1} = inf and the VE state is unbounded, so at
    sigma = inf `x` is read as the VP state x_vp itself (unit scale); the samplers handle that first step exactly.
    Epsilon prediction cannot give x0 there (x0 = (x_vp - sqrt(1 - abar) eps) / sqrt(abar) divides by 0) and is
    refused. `sigma_max` is then the largest finite training sigma (the top of continuous schedules).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod, prediction_type: str = "epsilon",
                 num_classes: int | None = None, scheduler_config: dict | None = None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction, sample)")
        cfg = getattr(unet, "config", None)
        get = (lambda k, d=None: getattr(cfg, k, d) if not isinstance(cfg, dict) else cfg.get(k, d)) \
            if cfg is not None else (lambda k, d=None: d)
        if get("class_embed_type") is not None:
            raise ValueError(f"UNet class_embed_type={get('class_embed_type')!r} is not supported: only class "
                             f"labels through num_class_embeds (class_embed_type None) are")
        self.time_embedding_type = get("time_embedding_type", "positional") or "positional"
        if self.time_embedding_type not in ("positional", "learned"):
            raise ValueError(f"UNet time_embedding_type={self.time_embedding_type!r} is not supported (positional or "
                             f"learned timesteps of a DDPM schedule are)")
        n_embeds = int(get("num_class_embeds") or 0)
        self.num_classes = n_embeds if num_classes is None else int(num_classes)
        if n_embeds and self.num_classes != n_embeds:
            raise ValueError(f"num_classes={self.num_classes} but the UNet has num_class_embeds={n_embeds}")
        self.in_channels = int(get("in_channels", 0) or 0)
        out_ch = int(get("out_channels", 0) or 0)
        if self.in_channels and out_ch not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"UNet has {out_ch} output channels for {self.in_channels} input channels: expected "
                             f"{self.in_channels} or {2 * self.in_channels} (learned variance)")
        self.learned_variance = bool(self.in_channels) and out_ch == 2 * self.in_channels
        self.unet = unet
        self.prediction_type = prediction_type
        self.scheduler_config = dict(scheduler_config or {})
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if abar.numel() < 2 or not bool(torch.all(abar[1:] <= abar[:-1])) or not 0 < float(abar[0]) <= 1 \
                or float(abar[-1]) < 0:
            raise ValueError("alphas_cumprod must be a decreasing sequence in [0, 1] with abar_0 > 0")
        self.zero_terminal_snr = float(abar[-1]) == 0.0
        if self.zero_terminal_snr and prediction_type == "epsilon":
            raise ValueError("epsilon prediction at zero terminal SNR (alphas_cumprod[-1] == 0, "
                             "rescale_betas_zero_snr) is refused: x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar) "
                             "divides by zero at the first step; use a v_prediction or sample-prediction model")
        sig = ((1 - abar) / abar).sqrt()  # inf where abar == 0
        self.register_buffer("train_sigmas", sig.float(), persistent=False)
        self.register_buffer("log_sigmas", self.train_sigmas.log(), persistent=False)
        self.num_train_timesteps = int(abar.numel())
        finite = sig[torch.isfinite(sig)]
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(finite[-1].float())
        self.sigma_data = 0.5

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep: t = i - 1 + (log sigma - log sigma_{i-1}) / (log sigma_i - log sigma_{i-1}) with i the
        number of training log-sigmas below log sigma (a count, not a search, so it exports to ONNX); clamped to
        [0, T-1]. sigma = inf -> T - 1."""
        ls = self.log_sigmas
        log_s = sigma.float().log().reshape(-1)
        idx = (ls.unsqueeze(0) < log_s.unsqueeze(1)).sum(1).clamp(1, ls.shape[0] - 1)
        lo, hi = ls[idx - 1], ls[idx]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        w = torch.where(torch.isinf(hi), torch.isinf(log_s).to(w.dtype), w)  # last interval of a zero-SNR schedule
        return (idx - 1).to(torch.float32) + w

    def snap(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest training level in log-sigma: (integer t, sigma_t). sigma = inf -> T - 1."""
        log_s = sigma.float().log().reshape(-1)
        dist = (self.log_sigmas.unsqueeze(0) - log_s.unsqueeze(1)).abs()
        dist = torch.where(torch.isnan(dist), torch.zeros_like(dist), dist)  # inf - inf: the inf level itself
        t = dist.argmin(1)
        return t, self.train_sigmas[t]

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        labels = _check_labels(labels, x, self.num_classes)
        if self.time_embedding_type == "learned":
            t, sigma = self.snap(sigma)
        else:
            t = self.sigma_to_t(sigma)
        s = sigma.reshape(-1, 1, 1, 1)
        inf = torch.isinf(s)
        alpha = 1 / (s**2 + 1).sqrt()  # sqrt(abar) = 1 / sqrt(1 + sigma^2); 0 at sigma = inf
        sigma_vp = 1 / (1 + 1 / s**2).sqrt()  # sqrt(1 - abar) = 1 / sqrt(1 + 1/sigma^2); 1 at sigma = inf
        xf = x.float()
        x_vp = torch.where(inf, xf, alpha * xf)  # at sigma = inf the input already is x_vp
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x_vp.to(dtype), t, class_labels=labels).sample
        if self.learned_variance:
            out = out[:, : self.in_channels]
        out = out.float()
        if self.prediction_type == "epsilon":
            x0 = xf - s * out  # x0_hat = x - sigma * eps_hat
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x_vp - sigma_vp * out  # x0_hat = alpha x_vp - sigma_vp v_hat
        else:
            x0 = out
        return x0.to(x.dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "DiffusersEpsDenoiser":
        """Load a local diffusers folder: a pipeline folder (model_index.json, unet/, scheduler/) or a bare UNet
        folder with a scheduler_config.json beside its config.json. Nothing is downloaded."""
        from onestep.importer import load_diffusers_folder

        return load_diffusers_folder(path)[0]


class OneStepGenerator(nn.Module):
    """G(z, labels) = D(sigma_g * z, sigma_g, labels): the one-step student with sigma_g fixed inside."""

    def __init__(self, denoiser: nn.Module, sigma_g: float):
        super().__init__()
        if not sigma_g > 0 or not math.isfinite(sigma_g):
            raise ValueError(f"sigma_g must be positive and finite, got {sigma_g}")
        self.denoiser = denoiser
        self.sigma_g = float(sigma_g)
        self.num_classes = getattr(denoiser, "num_classes", 0)

    def forward(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return self.denoiser(self.sigma_g * z, self.sigma_g, labels)

"""One interface for every network: D(x, sigma, labels) -> x0_hat (EDM notation, Karras et al. 2022).

- `EDMDenoiser` wraps a raw net F with EDM preconditioning (Eq. 7 and Table 1).
- `DiffusersEpsDenoiser` adapts a diffusers DDPM/DDIM model (eps-, v- or sample-prediction).
- `OneStepGenerator` is a student: G(z, labels) = D(sigma_g * z, sigma_g, labels).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

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
    """A diffusers DDPM/DDIM UNet + its scheduler's alphas_cumprod, seen as an EDM denoiser.

    VP <-> VE: sigma = sqrt((1 - abar) / abar), x_vp = x / sqrt(1 + sigma^2) (Karras et al. 2022, Sec. 2 and
    App. C.1); eps-prediction gives x0_hat = x - sigma * eps_hat. The continuous timestep for a sigma
    between training levels is interpolated in log-sigma.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 num_classes: int = 0):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.num_classes = int(num_classes)
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("train_sigmas", ((1 - abar) / abar).sqrt().float(), persistent=False)
        self.register_buffer("log_sigmas", self.train_sigmas.log(), persistent=False)
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(self.train_sigmas[-1])
        self.sigma_data = 0.5

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_s = sigma.log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        idx = torch.searchsorted(self.log_sigmas, log_s.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).float() + w

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        labels = _check_labels(labels, x, self.num_classes)
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / (s**2 + 1).sqrt()  # x_vp = x / sqrt(1 + sigma^2)
        out = self.unet(c_in * x, self.sigma_to_t(sigma), class_labels=labels).sample
        if self.prediction_type == "epsilon":
            return x - s * out
        alpha, sigma_vp = c_in, s * c_in
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma_vp x0
            return alpha * (c_in * x) - sigma_vp * out
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "DiffusersEpsDenoiser":
        """Load a local diffusers folder: a pipeline folder (unet/, scheduler/) or a bare UNet folder with a
        scheduler_config.json beside its config.json. Nothing is downloaded."""
        from diffusers import DDPMScheduler, UNet2DModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"diffusers model folder {path} does not exist")
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
        sched = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
        n_cls = unet.config.num_class_embeds or 0
        return cls(unet, sched.alphas_cumprod, sched.config.prediction_type, n_cls)


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

"""SFERD's one-step student (Zhou et al. AAAI 2024, Sec. 3.3): draft generator + semantic gradient predictor.

    x_t    = sigma_g z,  t = sigma_g                   the student's only input state (its single step is t = T)
    draft  = G(z, c) = D_student(x_t, sigma_g, c)      one-step generator from the teacher
    s      = E(x0)                                     semantic encoder of the clean image (training)
           | LatentSampler(P z | draft, c)             a tiny latent diffusion model, Euler steps unrolled (sampling)
    x_out  = draft + k * g_phi(x_t, t, s, c)           gradient predictor on (x_t, t) as in the paper's shifted
                                                       prediction, k = the schedule's shift coefficient at t = T

At sampling the latent must come from z alone, so its starting noise is a fixed orthonormal projection P z (z is
i.i.d. Gaussian, so P z is too) and (by default) the latent model is conditioned on the draft: the whole student
remains ONE deterministic graph (z, labels) -> image for export.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onestep.checkpoint import build_model, register_model_kind


def _groups(ch: int) -> int:
    return math.gcd(8, ch)


class SemanticEncoder(nn.Module):
    """x0 (B, C, H, W) -> s (B, d), standardised per sample (zero mean, unit variance: sigma_data = 1)."""

    def __init__(self, channels: int, latent_dim: int, width: int = 16):
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(channels, w, 3, 2, 1), nn.SiLU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(4))
        self.proj = nn.Linear(2 * w * 16, latent_dim)

    def forward(self, x):
        return F.layer_norm(self.proj(self.convs(x).flatten(1)), (self.proj.out_features,))


def _time_features(sigma: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Fourier features of c_noise = ln(sigma) / 4 (EDM Table 1)."""
    ang = (sigma.reshape(-1, 1).float().log() / 4) * freqs
    return torch.cat([ang.sin(), ang.cos()], 1)


class GradientPredictor(nn.Module):
    """g_phi(x_t, t, s, c): a small conv net on the noisy state x_t (scaled by EDM's c_in = 1/sqrt(sigma^2 +
    sigma_data^2)) FiLM-conditioned on the noise level t, the semantic latent s and the label; the last conv starts
    at zero so the student starts as its draft."""

    def __init__(self, channels: int, latent_dim: int, num_classes: int, width: int = 32, sigma_data: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.sigma_data = float(sigma_data)
        self.emb = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)), persistent=False)
        self.inp = nn.Conv2d(channels, width, 3, 1, 1)
        self.film = nn.Linear(latent_dim + 16, 4 * width)
        self.mid = nn.Conv2d(width, width, 3, 1, 1)
        self.norm1, self.norm2 = nn.GroupNorm(_groups(width), width), nn.GroupNorm(_groups(width), width)
        self.out = nn.Conv2d(width, channels, 3, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t, sigma, s, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        c_in = (1 / (sigma**2 + self.sigma_data**2).sqrt()).reshape(-1, 1, 1, 1)
        cond = s + (self.emb(labels) if self.emb is not None else 0)
        cond = torch.cat([cond, _time_features(sigma, self.freqs).to(cond.dtype)], 1)
        a1, b1, a2, b2 = self.film(cond)[:, :, None, None].chunk(4, dim=1)
        h = F.silu(self.norm1(self.inp((c_in * x_t).to(x_t.dtype))) * (1 + a1) + b1)
        h = F.silu(self.norm2(self.mid(h)) * (1 + a2) + b2)
        return self.out(h)


def shift_coefficient(sigma: float) -> float:
    """The coefficient that scales the predicted gradient in x0-space, sigma_vp^2 / alpha at the student's level
    (VP form of the paper's shifted x0 prediction), in EDM terms sigma^2 / sqrt(1 + sigma^2)."""
    return float(sigma) ** 2 / math.sqrt(1 + float(sigma) ** 2)


class LatentDenoiser(nn.Module):
    """D_lat(s_t, sigma | draft, c) -> s0_hat: an MLP with EDM preconditioning (EDM Eq. 7, sigma_data = 1)."""

    def __init__(self, latent_dim: int, num_classes: int, hidden: int = 128, cond_pool: int = 8):
        super().__init__()
        self.cond_pool = cond_pool  # 0 = unconditional latent model (no draft input)
        self.emb = nn.Embedding(num_classes, 16) if num_classes else None
        n_in = latent_dim + 16 + cond_pool * cond_pool + (16 if num_classes else 0)
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, latent_dim))
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)), persistent=False)

    def forward(self, s_t, sigma, draft, labels=None):
        sigma = sigma.reshape(-1, 1)
        c_skip, c_out, c_in = 1 / (sigma**2 + 1), sigma / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1).sqrt()
        ang = (sigma.log() / 4) * self.freqs  # c_noise = ln(sigma) / 4, Fourier features
        parts = [c_in * s_t, ang.sin(), ang.cos()]
        if self.cond_pool:
            parts.append(F.adaptive_avg_pool2d(draft.mean(1, keepdim=True), self.cond_pool).flatten(1))
        if self.emb is not None:
            parts.append(self.emb(labels))
        return c_skip * s_t + c_out * self.mlp(torch.cat(parts, 1))


def latent_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras schedule (EDM Eq. 5) for the latent sampler, ending at 0."""
    i = np.arange(n)
    s = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [float(v) for v in s] + [0.0]


class SFERDGenerator(nn.Module):
    def __init__(self, generator: nn.Module, image_shape, latent_dim: int = 16, latent_steps: int = 4,
                 latent_sigma_max: float = 20.0, latent_sigma_min: float = 0.02, grad_scale: float = 1.0,
                 width: int = 32, projection_seed: int = 0, latent_on_draft: bool = True):
        super().__init__()
        self.generator = generator
        self.num_classes = int(getattr(generator, "num_classes", 0))
        self.sigma_g = float(generator.sigma_g)
        sigma_data = float(getattr(generator.denoiser, "sigma_data", 0.5))
        c, h, w = image_shape
        self.latent_dim, self.grad_scale = int(latent_dim), float(grad_scale)
        self.encoder = SemanticEncoder(c, latent_dim)
        self.predictor = GradientPredictor(c, latent_dim, self.num_classes, width, sigma_data)
        self.latent = LatentDenoiser(latent_dim, self.num_classes, cond_pool=8 if latent_on_draft else 0)
        self.sigmas = latent_sigmas(latent_steps, latent_sigma_min, latent_sigma_max)
        g = torch.Generator().manual_seed(projection_seed)
        q, _ = torch.linalg.qr(torch.randn(c * h * w, latent_dim, generator=g))
        self.register_buffer("projection", q.T.contiguous())  # (d, C*H*W), orthonormal rows

    def sample_latent(self, z, draft, labels=None):
        """Euler on the latent probability-flow ODE from s_T = sigma_max * P z (EDM Alg. 1 without the Heun step)."""
        s = self.sigmas[0] * (z.flatten(1).float() @ self.projection.T)
        for cur, nxt in zip(self.sigmas[:-1], self.sigmas[1:]):
            sig = torch.full((s.shape[0],), cur, device=s.device)
            d = (s - self.latent(s, sig, draft.float(), labels)) / cur
            s = s + (nxt - cur) * d
        return s

    def noisy_state(self, z):
        """The student's input state: x_t = sigma_g z at t = sigma_g."""
        return self.sigma_g * z, torch.full((z.shape[0],), self.sigma_g, device=z.device)

    def refine(self, z, draft, s, labels=None):
        """x_out = draft + k g_phi(x_t, t, s, c) (the paper's shifted x0 prediction)."""
        x_t, t = self.noisy_state(z)
        return draft + self.grad_scale * self.predictor(x_t, t, s, labels).to(draft.dtype)

    def forward(self, z, labels=None):
        draft = self.generator(z, labels)
        s = self.sample_latent(z, draft, labels).to(draft.dtype)
        return self.refine(z, draft, s, labels)


def sferd_spec(generator_spec: dict, image_shape, latent_dim, latent_steps, latent_sigma_max, latent_sigma_min,
               grad_scale, width, latent_on_draft: bool = True) -> dict:
    return {"kind": "sferd-generator", "generator": generator_spec, "image_shape": list(image_shape),
            "latent_dim": latent_dim, "latent_steps": latent_steps, "latent_sigma_max": latent_sigma_max,
            "latent_sigma_min": latent_sigma_min, "grad_scale": grad_scale, "width": width,
            "latent_on_draft": bool(latent_on_draft)}


@register_model_kind("sferd-generator")
def _build(spec: dict) -> nn.Module:
    return SFERDGenerator(build_model(spec["generator"]), tuple(spec["image_shape"]), spec["latent_dim"],
                          spec["latent_steps"], spec["latent_sigma_max"], spec["latent_sigma_min"],
                          spec["grad_scale"], spec["width"], latent_on_draft=spec.get("latent_on_draft", True))

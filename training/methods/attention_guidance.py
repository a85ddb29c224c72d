"""Attention-guided teacher (SFERD, Zhou et al. AAAI 2024, Sec. 3.2; the guidance itself follows self-attention
guidance, Hong et al. ICCV 2023), seen through the one denoiser interface D(x, sigma, labels) -> x0_hat.

At x = x0 + sigma eps:
1. x0_hat = D(x, sigma), eps_hat = (x - x0_hat) / sigma, and the teacher's attention map A over positions;
2. mask M = [A > mean(A)]: the regions the teacher attends to;
3. degrade inside the mask: x0_deg = M * blur(x0_hat) + (1 - M) * x0_hat (Gaussian blur);
4. re-noise with the same eps_hat: x_deg = x0_deg + sigma eps_hat, and ask the teacher again: eps_deg;
5. eps_guided = eps_hat + w (eps_hat - eps_deg), w ~ 0.1-0.3 (equivalently eps_deg + (1 + w)(eps_hat - eps_deg));
   returned as x0_guided = x - sigma eps_guided = x0_hat + w (x0_deg - D(x_deg, sigma)).

The attention map: when the teacher has self-attention layers their maps would be the natural choice; our
shipped teacher has none, so A is the parameter-free dot-product self-attention of the teacher's bottleneck
features h (positions as tokens): A_j = mean_i softmax_j(h_i . h_j / sqrt(C)), the attention position j receives,
upsampled to the image. It is computed in the same forward pass that gives x0_hat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel(sigma: float, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel, reflect padding (shape preserved)."""
    k = gaussian_kernel(sigma, x.dtype).to(x.device)
    r = (len(k) - 1) // 2
    c = x.shape[1]
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def feature_attention_map(h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) features -> (B, 1, H, W): attention each position receives under softmax(h h^T / sqrt(C))."""
    b, c = h.shape[:2]
    tokens = h.float().flatten(2).transpose(1, 2)  # (B, N, C)
    attn = torch.softmax(tokens @ tokens.transpose(1, 2) / math.sqrt(c), dim=-1)  # (B, N_query, N_key)
    received = attn.mean(1).reshape(b, 1, *h.shape[2:])
    return F.interpolate(received, size=size, mode="bilinear", align_corners=False)


class AttentionGuidedDenoiser(nn.Module):
    """The teacher with attention guidance; drop-in wherever a denoiser goes (samplers, pair caches)."""

    def __init__(self, teacher: nn.Module, w: float = 0.2, blur_sigma: float = 1.0):
        super().__init__()
        if not hasattr(teacher, "net") or not hasattr(teacher.net, "mid_block"):
            raise ValueError("attention guidance needs a UNet teacher (EDMDenoiser over a diffusers UNet2DModel)")
        self.teacher = teacher
        self.w, self.blur_sigma = float(w), float(blur_sigma)
        for name in ("spec", "num_classes", "sigma_min", "sigma_max", "sigma_data"):
            if hasattr(teacher, name):
                setattr(self, name, getattr(teacher, name))
        self._h = None
        teacher.net.mid_block.register_forward_hook(self._grab)

    def _grab(self, module, inputs, output):
        self._h = output

    def attention_mask(self, size) -> torch.Tensor:
        a = feature_attention_map(self._h, size)
        return (a > a.mean((2, 3), keepdim=True)).float()

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        x0_hat = self.teacher(x, sigma, labels).float()
        if self.w == 0:
            return x0_hat.to(x.dtype)
        mask = self.attention_mask(x.shape[-2:])
        x0_deg = mask * gaussian_blur(x0_hat, self.blur_sigma) + (1 - mask) * x0_hat
        eps_hat = (x.float() - x0_hat) / s
        x_deg = x0_deg + s * eps_hat
        eps_deg = (x_deg - self.teacher(x_deg.to(x.dtype), sigma, labels).float()) / s
        eps_guided = eps_hat + self.w * (eps_hat - eps_deg)
        return (x.float() - s * eps_guided).to(x.dtype)

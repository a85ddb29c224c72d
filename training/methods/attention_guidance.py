"""Attention-guided teacher (SFERD, Zhou et al. AAAI 2024, Sec. 3.2, built on self-attention guidance, Hong et al.
ICCV 2023), seen through the one denoiser interface D(x, sigma, labels) -> x0_hat.

At x = x0 + sigma eps (EDM/VE notation; the VP form of the paper is the same after x_vp = x / sqrt(1 + sigma^2)):
1. x0_hat = D(x, sigma), eps_hat = (x - x0_hat) / sigma, and the teacher's self-attention map A at x;
2. mask M = [sum_queries A(query, key) > 1]: the keys receiving more than the mean attention (each query row
   sums to 1, so the mean received attention is exactly 1), at the attention layer's resolution, upsampled by
   nearest neighbour to the image;
3. degrade inside the mask: x0_deg = M * blur(x0_hat) + (1 - M) * x0_hat (Gaussian blur, sigma 3, kernel 15);
4. re-noise with the same eps_hat: x_deg = x0_deg + sigma eps_hat, and ask the teacher again: eps_deg;
5. eps_guided = eps_deg + w (eps_hat - eps_deg) (w = 1.3; w = 1 is the plain teacher), returned as
   x0_guided = x - sigma eps_guided.

The attention map: when the teacher has self-attention layers (diffusers `Attention` modules, e.g. the
AttnDownBlock2D / AttnUpBlock2D of `onestep.nets.UNetConfig(attention=True)`), A is the softmax attention of one
of them (by default the last one the forward pass runs: the decoder's, as the paper takes it from an output
block), averaged over heads. It is recomputed from the layer's own input, norm and query/key projections by a
forward pre-hook, so the teacher's output is untouched. Only a teacher without any attention layer falls back to
the parameter-free dot-product self-attention of its bottleneck features h (positions as tokens):
A = softmax(h h^T / sqrt(C)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from onestep.denoiser import raw_network


def gaussian_kernel(sigma: float, kernel_size: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian; kernel_size None = 2 ceil(3 sigma) + 1 taps."""
    radius = max(1, int(math.ceil(3 * sigma))) if kernel_size is None else (int(kernel_size) - 1) // 2
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur per channel, reflect padding (shape preserved; the radius is capped below the
    image size so small images still pad by reflection)."""
    k = gaussian_kernel(sigma, kernel_size, x.dtype).to(x.device)
    r = (len(k) - 1) // 2
    cap = min(x.shape[-2:]) - 1
    if r > cap:
        k = k[r - cap: r + cap + 1]
        k = k / k.sum()
        r = cap
    c = x.shape[1]
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def received_attention(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, N_query, N_key) softmax attention -> (B, 1, h, w): attention each key position receives, summed over
    queries (mean 1 per image)."""
    return probs.float().sum(1).reshape(probs.shape[0], 1, *hw)


def feature_attention_map(h: torch.Tensor) -> torch.Tensor:
    """Fallback: (B, C, h, w) features -> (B, 1, h, w) received attention under softmax(h h^T / sqrt(C))."""
    c = h.shape[1]
    tokens = h.float().flatten(2).transpose(1, 2)  # (B, N, C)
    attn = torch.softmax(tokens @ tokens.transpose(1, 2) / math.sqrt(c), dim=-1)  # (B, N_query, N_key)
    return received_attention(attn, h.shape[2:])


def attention_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention layers of a raw network (diffusers `Attention` modules) in the order a UNet's forward pass
    runs them: encoder (down_blocks), middle (mid_block), decoder (up_blocks)."""
    from diffusers.models.attention_processor import Attention

    found = [(n, m) for n, m in net.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(found, key=lambda nm: stage.get(nm[0].split(".")[0], 1))


def layer_attention_probs(attn: nn.Module, hidden_states: torch.Tensor, temb=None) -> torch.Tensor:
    """softmax(q k^T * scale) of a diffusers `Attention` layer for its input (B, C, H, W) or (B, N, C), averaged
    over heads -> (B, N_query, N_key). The same q and k the layer itself computes (AttnProcessor2_0 order)."""
    h = hidden_states
    if attn.spatial_norm is not None:
        h = attn.spatial_norm(h, temb)
    if h.ndim == 4:
        b, c, hh, ww = h.shape
        h = h.reshape(b, c, hh * ww).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    q, k = attn.to_q(h), attn.to_k(h)
    b, n, inner = q.shape
    d = inner // attn.heads
    q = q.reshape(b, n, attn.heads, d).transpose(1, 2)
    k = k.reshape(b, n, attn.heads, d).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
    return probs.mean(1)


class AttentionGuidedDenoiser(nn.Module):
    """The teacher with attention guidance; drop-in wherever a denoiser goes (samplers, pair caches).

    attention_layer: index into `attention_layers(raw net)` (default -1: the last one); ignored by the fallback.
    clip_x0: clamp the teacher's x0 to the data range [-1, 1] before it is blurred and re-noised, as the SFERD
        authors' code does (its clip_denoised=True); the guided target itself is not clamped.
    """

    def __init__(self, teacher: nn.Module, w: float = 1.3, blur_sigma: float = 3.0, blur_kernel: int | None = 15,
                 attention_layer: int = -1, clip_x0: bool = True):
        super().__init__()
        self.teacher = teacher
        self.clip_x0 = bool(clip_x0)
        self.w, self.blur_sigma, self.blur_kernel = float(w), float(blur_sigma), blur_kernel
        for name in ("spec", "num_classes", "sigma_min", "sigma_max", "sigma_data", "train_sigmas"):
            if hasattr(teacher, name):
                setattr(self, name, getattr(teacher, name))
        net = raw_network(teacher)
        layers = attention_layers(net)
        self._capture = False
        self._map = None
        if layers:
            self.attention_source = layers[attention_layer][0]
            layers[attention_layer][1].register_forward_pre_hook(self._grab_layer, with_kwargs=True)
        else:
            if not hasattr(net, "mid_block"):
                raise ValueError("attention guidance needs a teacher with self-attention layers or a UNet middle "
                                 "block (diffusers UNet2DModel)")
            self.attention_source = "mid_block features (parameter-free self-attention)"
            net.mid_block.register_forward_hook(self._grab_features)

    @property
    def uses_teacher_attention(self) -> bool:
        return not self.attention_source.startswith("mid_block features")

    def _grab_layer(self, module, args, kwargs):
        if self._capture:
            hs = args[0] if args else kwargs["hidden_states"]
            probs = layer_attention_probs(module, hs, kwargs.get("temb"))
            hw = hs.shape[2:] if hs.ndim == 4 else (int(round(math.sqrt(probs.shape[-1]))),) * 2
            self._map = received_attention(probs, tuple(hw))

    def _grab_features(self, module, inputs, output):
        if self._capture:
            self._map = feature_attention_map(output)

    def attention_map(self) -> torch.Tensor:
        """(B, 1, h, w) attention received per position at the last guided call's x (attention resolution)."""
        return self._map

    def attention_mask(self, size) -> torch.Tensor:
        """Binary mask [received attention > mean = 1] upsampled (nearest) to `size`."""
        return F.interpolate((self._map > 1.0).float(), size=tuple(size), mode="nearest")

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        self._capture = True
        try:
            x0_hat = self.teacher(x, sigma, labels).float()
        finally:
            self._capture = False
        if self.w == 1.0:
            return x0_hat.to(x.dtype)
        mask = self.attention_mask(x.shape[-2:])
        x0_src = x0_hat.clamp(-1.0, 1.0) if self.clip_x0 else x0_hat
        x0_deg = mask * gaussian_blur(x0_src, self.blur_sigma, self.blur_kernel) + (1 - mask) * x0_src
        eps_hat = (x.float() - x0_hat) / s
        x_deg = x0_deg + s * eps_hat
        eps_deg = (x_deg - self.teacher(x_deg.to(x.dtype), sigma, labels).float()) / s
        eps_guided = eps_deg + self.w * (eps_hat - eps_deg)  # SFERD Sec. 3.2, step 5 above
        return (x.float() - s * eps_guided).to(x.dtype)

"""Adv-KD's networks (Mekonnen et al., arXiv 2405.20675), for any image shape (C, H, W).

StagedGenerator: a small randomly initialised generator made of stacked blocks ("layerwise denoising
transformations"); block k works at resolution r_k (growing to H: the last two stages at H, each earlier one at
half the next, at least 4) and ends in an output head ("submodule predicting the teacher's output at a point in
time") for teacher snapshot k; the last head predicts the teacher's sample and is the one-step student. The
starting noise z enters pooled to r_0 (rescaled to unit variance) and, by default, again pooled to r_k at every
block. Heads end in tanh (the teacher states are images in [-1, 1]).

NoiseConditionedDiscriminator: one per stage. It judges (image at r_k, starting noise pooled to 4x4) pairs, so
"real" means "this teacher state belongs to THIS noise"; an image branch and a noise branch are joined by an MLP,
plus a label projection for class-conditional teachers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from onestep.checkpoint import register_model_kind


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


def stage_resolutions(size: int, n_stages: int, min_res: int = 4) -> tuple[int, ...]:
    """r_k: the last two stages at `size`, each earlier stage at half (rounded up) the next one, at least min_res
    (or `size` when smaller)."""
    res = [size] * min(2, n_stages)
    while len(res) < n_stages:
        res.insert(0, max(min(min_res, size), math.ceil(res[0] / 2)))
    return tuple(res)


def pooled_noise(z: torch.Tensor, res: int) -> torch.Tensor:
    """z average-pooled to res x res, rescaled so that i.i.d. unit Gaussian z stays unit variance."""
    if z.shape[-1] == res and z.shape[-2] == res:
        return z
    return F.adaptive_avg_pool2d(z, res) * math.sqrt(z.shape[-2] * z.shape[-1] / (res * res))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.n1, self.c1, self.n2, self.c2 = _gn(ch), nn.Conv2d(ch, ch, 3, 1, 1), _gn(ch), nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class StagedGenerator(nn.Module):
    """(z, labels) -> per-stage outputs at resolutions `self.resolutions`; forward returns the last (full size)."""

    def __init__(self, image_shape=(1, 32, 32), width: int = 32, num_classes: int = 0, n_stages: int = 4,
                 noise_at_every_stage: bool = True, tanh_heads: bool = True):
        super().__init__()
        c_img, h, w_img = image_shape
        if h != w_img:
            raise ValueError(f"StagedGenerator needs square images, got {h}x{w_img}")
        self.image_shape = tuple(image_shape)
        self.num_classes = int(num_classes)
        self.noise_at_every_stage = bool(noise_at_every_stage)
        self.tanh_heads = bool(tanh_heads)
        self.resolutions = stage_resolutions(h, n_stages)
        chans = [min(4 * width, width * max(1, h // r)) for r in self.resolutions]
        self.chans = chans
        self.emb = nn.Embedding(num_classes, chans[0]) if num_classes else None
        blocks = []
        for k, ch in enumerate(chans):
            c_in = (c_img if k == 0 else chans[k - 1] + (c_img if self.noise_at_every_stage else 0))
            blocks.append(nn.ModuleDict({"inp": nn.Conv2d(c_in, ch, 3, 1, 1), "norm": _gn(ch), "res": ResBlock(ch)}))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(ch, c_img, 3, 1, 1)) for ch in chans)

    @property
    def n_stages(self) -> int:
        return len(self.blocks)

    def stage_parameters(self, k: int):
        """Block k and head k: what stage k trains."""
        return list(self.blocks[k].parameters()) + list(self.heads[k].parameters())

    def _block(self, k, h, z, labels):
        r = self.resolutions[k]
        if k == 0:
            x = pooled_noise(z, r)
        else:
            h = F.interpolate(h, size=(r, r), mode="nearest") if h.shape[-1] != r else h
            x = torch.cat([h, pooled_noise(z, r)], 1) if self.noise_at_every_stage else h
        b = self.blocks[k]
        out = b["inp"](x)
        if k == 0 and self.emb is not None:
            out = out + self.emb(labels)[:, :, None, None]
        return b["res"](F.silu(b["norm"](out)))

    def head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        y = self.heads[k](h)
        return torch.tanh(y) if self.tanh_heads else y

    def features(self, z, labels=None, upto: int | None = None, frozen_below: int = 0) -> list[torch.Tensor]:
        """Block outputs 0..upto; blocks below `frozen_below` run without autograd (earlier, finished stages)."""
        upto = self.n_stages - 1 if upto is None else upto
        feats, h = [], None
        for k in range(upto + 1):
            if k < frozen_below:
                with torch.no_grad():
                    h = self._block(k, h, z, labels)
            else:
                h = self._block(k, h, z, labels)
            feats.append(h)
        return feats

    def stage_output(self, z, labels=None, k: int | None = None, frozen_below: int = 0) -> torch.Tensor:
        """Head k's prediction (teacher snapshot k, or the teacher's sample for the last stage)."""
        k = self.n_stages - 1 if k is None else k
        return self.head(k, self.features(z, labels, k, frozen_below)[-1])

    def forward_stages(self, z, labels=None, upto: int | None = None) -> list[torch.Tensor]:
        feats = self.features(z, labels, upto)
        return [self.head(k, f) for k, f in enumerate(feats)]

    def forward(self, z, labels=None):
        return self.stage_output(z, labels)


class NoiseConditionedDiscriminator(nn.Module):
    """D(x, z, labels) -> logit for one stage: x (B, C, r, r); z (B, C, H, W) enters pooled to noise_pool."""

    def __init__(self, image_shape, width: int = 32, num_classes: int = 0, noise_pool: int = 4,
                 noise_channels: int | None = None):
        super().__init__()
        c, r = image_shape[0], image_shape[1]
        w = width
        self.size, self.noise_pool = r, noise_pool
        layers, ch, size = [nn.Conv2d(c, w, 3, 1, 1), nn.LeakyReLU(0.2)], w, r
        while size > 4:
            layers += [nn.Conv2d(ch, min(2 * ch, 4 * w), 4, 2, 1), nn.LeakyReLU(0.2)]
            ch, size = min(2 * ch, 4 * w), math.ceil(size / 2)
        self.image_branch = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        nc = noise_channels or c
        self.noise_branch = nn.Sequential(nn.Conv2d(nc, w, 3, 1, 1), nn.LeakyReLU(0.2),
                                          nn.Conv2d(w, 2 * w, 3, 1, 1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(ch * 16 + 2 * w * 4, 4 * w)
        self.out = nn.Linear(4 * w, 1)
        self.label_emb = nn.Embedding(num_classes, 4 * w) if num_classes else None

    def forward(self, x, z, labels=None):
        hi = self.image_branch(x).flatten(1)
        hz = self.noise_branch(pooled_noise(z, self.noise_pool)).flatten(1)
        h = F.leaky_relu(self.fc(torch.cat([hi, hz], 1)), 0.2)
        logit = self.out(h).squeeze(1)
        if self.label_emb is not None:
            logit = logit + (h * self.label_emb(labels)).sum(1)
        return logit


def staged_spec(image_shape, width: int, num_classes: int, n_stages: int = 4, noise_at_every_stage: bool = True,
                tanh_heads: bool = True) -> dict:
    return {"kind": "staged-generator", "image_shape": list(image_shape), "width": width, "num_classes": num_classes,
            "n_stages": n_stages, "noise_at_every_stage": noise_at_every_stage, "tanh_heads": tanh_heads}


@register_model_kind("staged-generator")
def _build(spec: dict) -> nn.Module:
    return StagedGenerator(tuple(spec["image_shape"]), spec["width"], spec["num_classes"], spec.get("n_stages", 4),
                           spec.get("noise_at_every_stage", True), spec.get("tanh_heads", True))

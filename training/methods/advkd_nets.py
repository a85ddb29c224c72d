"""Adv-KD's networks (arXiv 2405.20675), written for our 32x32 teacher.

StagedGenerator: a small randomly initialised generator whose blocks run at growing resolution (8 -> 16 -> 32 -> 32);
block k ends in an output head that predicts teacher snapshot k (the trajectory state at the k-th recorded sigma,
average-pooled to the block's resolution); the last head predicts the teacher's sample and is the one-step
student. The noise z is read once by a small encoder whose features feed the blocks as skips.

NoiseConditionedDiscriminator: judges (image, down-sampled starting noise z), so "real" means "this teacher
state belongs to THIS noise", with label and stage projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from onestep.checkpoint import register_model_kind


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.n1, self.c1, self.n2, self.c2 = _gn(ch), nn.Conv2d(ch, ch, 3, 1, 1), _gn(ch), nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class StagedGenerator(nn.Module):
    """(z, labels) -> list of per-stage outputs at resolutions (8, 16, 32, 32); forward returns the last."""

    resolutions = (8, 16, 32, 32)

    def __init__(self, image_shape=(1, 32, 32), width: int = 32, num_classes: int = 0):
        super().__init__()
        c_img, h, _ = image_shape
        if h != 32:
            raise ValueError("StagedGenerator is laid out for 32x32 images")
        w = width
        self.num_classes = int(num_classes)
        self.stem = nn.Conv2d(c_img, w, 3, 1, 1)  # 32
        self.down16 = nn.Conv2d(w, 2 * w, 3, 2, 1)
        self.down8 = nn.Conv2d(2 * w, 4 * w, 3, 2, 1)
        self.emb = nn.Embedding(num_classes, 4 * w) if num_classes else None
        self.block8 = ResBlock(4 * w)
        self.up16, self.block16 = nn.Conv2d(4 * w, 2 * w, 3, 1, 1), ResBlock(2 * w)
        self.up32, self.block32 = nn.Conv2d(2 * w, w, 3, 1, 1), ResBlock(w)
        self.block_out = ResBlock(w)
        self.heads = nn.ModuleList(nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(ch, c_img, 3, 1, 1))
                                   for ch in (4 * w, 2 * w, w, w))

    def forward_stages(self, z, labels=None, upto: int = 3) -> list[torch.Tensor]:
        h32 = self.stem(z)
        h16 = self.down16(F.silu(h32))
        h = self.down8(F.silu(h16))
        if self.emb is not None:
            h = h + self.emb(labels)[:, :, None, None]
        outs = []
        h = self.block8(h)
        outs.append(self.heads[0](h))
        if upto >= 1:
            h = self.block16(self.up16(F.interpolate(h, scale_factor=2.0, mode="nearest")) + h16)
            outs.append(self.heads[1](h))
        if upto >= 2:
            h = self.block32(self.up32(F.interpolate(h, scale_factor=2.0, mode="nearest")) + h32)
            outs.append(self.heads[2](h))
        if upto >= 3:
            outs.append(self.heads[3](self.block_out(h)))
        return outs

    def forward(self, z, labels=None):
        return self.forward_stages(z, labels)[-1]


class NoiseConditionedDiscriminator(nn.Module):
    """D(x, z, stage, labels) -> logit. x at any of the stage resolutions is resized to 32; z enters pooled to 8x8
    (then upsampled), as an extra input channel. Projection terms for the label and the stage."""

    def __init__(self, image_shape=(1, 32, 32), width: int = 32, num_classes: int = 0, n_stages: int = 4,
                 noise_pool: int = 8):
        super().__init__()
        c, w = image_shape[0], width
        self.noise_pool = noise_pool
        self.size = image_shape[1:]
        self.convs = nn.Sequential(
            nn.Conv2d(2 * c, w, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2))
        self.fc = nn.Linear(4 * w * 16, 4 * w)
        self.out = nn.Linear(4 * w, 1)
        self.stage_emb = nn.Embedding(n_stages, 4 * w)
        self.label_emb = nn.Embedding(num_classes, 4 * w) if num_classes else None

    def forward(self, x, z, stage: int, labels=None):
        x = F.interpolate(x, size=self.size, mode="nearest") if x.shape[-2:] != self.size else x
        zc = F.interpolate(F.adaptive_avg_pool2d(z, self.noise_pool), size=self.size, mode="nearest")
        h = F.leaky_relu(self.fc(self.convs(torch.cat([x, zc], 1)).flatten(1)), 0.2)
        proj = self.stage_emb.weight[stage].unsqueeze(0)
        if self.label_emb is not None:
            proj = proj + self.label_emb(labels)
        return self.out(h).squeeze(1) + (h * proj).sum(1)


def staged_spec(image_shape, width: int, num_classes: int) -> dict:
    return {"kind": "staged-generator", "image_shape": list(image_shape), "width": width, "num_classes": num_classes}


@register_model_kind("staged-generator")
def _build(spec: dict) -> nn.Module:
    return StagedGenerator(tuple(spec["image_shape"]), spec["width"], spec["num_classes"])

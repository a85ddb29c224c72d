"""Raw networks F (no preconditioning): diffusers UNet2DModel built from a frozen config."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class UNetConfig:
    resolution: int = 32
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention at the second level (16x16 for 32x32 input) and in the middle
    num_classes: int = 10  # 0 = unconditional
    norm_num_groups: int = 32
    dropout: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["block_out_channels"] = tuple(d["block_out_channels"])
        return cls(**d)


def build_unet(cfg: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention and n > 1:
        down[1] = "AttnDownBlock2D"
        up[n - 2] = "AttnUpBlock2D"
    groups = min(cfg.norm_num_groups, *cfg.block_out_channels)
    for c in cfg.block_out_channels:
        if c % groups:
            raise ValueError(f"block_out_channels {cfg.block_out_channels} not divisible by {groups} groups")
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=cfg.channels, out_channels=cfg.channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), add_attention=cfg.attention,
        num_class_embeds=cfg.num_classes or None, norm_num_groups=groups, dropout=cfg.dropout,
        attention_head_dim=8,
    )

"""Named presets: each pins a reproducible recipe. The comment says what it reaches and with which command;
the numbers live in benchmarks/results/ next to the command that measured them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onestep.config import OptimConfig, TrainConfig, from_dict, to_dict
from onestep.nets import UNetConfig
from training.methods.edm import EDMTeacherConfig


@dataclass(frozen=True)
class RunConfig:
    method: str
    data: str = "fashion-mnist"  # 'fashion-mnist', a .npz file or an image folder
    teacher: str | None = None  # teacher checkpoint for distillation methods
    method_cfg: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"method": self.method, "data": self.data, "teacher": self.teacher,
                "method_cfg": to_dict(self.method_cfg), "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        from training.methods import METHODS

        cfg_cls = METHODS[d["method"]][1]
        return cls(method=d["method"], data=d.get("data", "fashion-mnist"), teacher=d.get("teacher"),
                   method_cfg=from_dict(cfg_cls, d.get("method_cfg") or {}),
                   train=from_dict(TrainConfig, d.get("train") or {}))


FMNIST_UNET = UNetConfig(resolution=32, channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                         attention=False, num_classes=10)
TINY_UNET = UNetConfig(resolution=32, channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       attention=False, num_classes=10, norm_num_groups=4)

PRESETS: dict[str, RunConfig] = {
    # The shipped teacher (artifacts/fmnist-teacher.safetensors): 1.05M params, batch 64, CPU-trainable.
    # Quality vs NFE: benchmarks/results/teacher_quality.md (onestep evaluate ...).
    "fmnist-teacher": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=FMNIST_UNET, optim=OptimConfig(lr=6e-4, warmup_steps=200)),
        train=TrainConfig(steps=2500, batch_size=64, ema_decay=0.998, clip_grad_norm=1.0, log_every=25,
                          ckpt_every=250, sample_every=500, seed=0, num_threads=1)),
    # Seconds on CPU: for tests and smoke runs only; its samples are noise-like.
    "tiny-teacher": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=TINY_UNET, grid_steps=4, optim=OptimConfig(lr=2e-3, warmup_steps=5)),
        train=TrainConfig(steps=20, batch_size=8, ema_decay=0.9, log_every=5, ckpt_every=10, sample_every=20,
                          seed=0)),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]

"""Configuration as data: frozen dataclasses, serialisable to JSON and back."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warm-up
    # after the warm-up: "constant", or "cosine" from lr down to lr * min_lr_ratio at the run's last iteration
    # (an annealing phase, e.g. to finish a teacher trained at a constant rate)
    decay: str = "constant"
    min_lr_ratio: float = 0.0


def learning_rate(oc: OptimConfig, it: int, total_steps: int) -> float:
    """Learning rate at iteration `it` (0-based) of a run of `total_steps` iterations."""
    warm = min(1.0, (it + 1) / oc.warmup_steps) if oc.warmup_steps > 0 else 1.0
    if oc.decay == "constant":
        return oc.lr * warm
    if oc.decay != "cosine":
        raise ValueError(f"unknown learning-rate decay {oc.decay!r}; expected 'constant' or 'cosine'")
    span = max(1, total_steps - oc.warmup_steps)
    frac = min(1.0, max(0.0, (it - oc.warmup_steps) / span))
    scale = oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return oc.lr * warm * scale


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer iterations
    batch_size: int = 64  # global batch (split across data-parallel ranks)
    grad_accum: int = 1
    ema_decay: float = 0.999  # per iteration; warmed up as min(decay, (1+it)/(10+it))
    # further EMA lengths kept beside the main one (exported as model-ema<decay>.safetensors at each checkpoint),
    # so the final EMA can be chosen on a held-out metric instead of fixed in advance
    extra_ema_decays: tuple[float, ...] = ()
    # power-function EMAs (EDM2) by relative std, e.g. (0.05, 0.1): lengths proportional to the training so far,
    # distinct from the first iteration (the classic lengths above coincide while the warm-up binds, ~10k its)
    extra_ema_sigma_rels: tuple[float, ...] = ()
    clip_grad_norm: float | None = 1.0
    max_nan_skips: int = 20  # consecutive non-finite steps tolerated before the run stops
    log_every: int = 25
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    # every N iterations also keep the product (main EMA, fp16) as snapshots/model-<it>.safetensors, for a quality
    # vs kimg curve measured afterwards; 0 = off
    snapshot_every: int = 0
    export_dtype: str = "fp32"  # fp32 | fp16: the weights of every exported product (model*.safetensors, snapshots)
    sample_every: int = 500
    metric_every: int = 0  # 0 = only at the end
    metric_samples: int = 1000
    seed: int = 0
    amp: str = "auto"  # auto (bf16 autocast on CUDA, off on CPU) | off | bf16 | fp16
    num_threads: int = 0  # torch CPU threads, 0 = torch default


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, d: dict) -> Any:
    """Inverse of `to_dict` for (nested) frozen dataclasses with tuple fields."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**kwargs)


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply 'a.b=value' overrides (value parsed as JSON when possible) to a frozen dataclass tree."""
    import json

    for a in assignments:
        if "=" not in a:
            raise ValueError(f"override {a!r} is not of the form key=value")
        key, raw = a.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cfg = _set(cfg, key.split("."), value)
    return cfg


def _set(cfg: Any, path: list[str], value: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    if path[0] not in names:
        raise ValueError(f"{type(cfg).__name__} has no field {path[0]!r} (fields: {sorted(names)})")
    if len(path) == 1:
        if isinstance(value, list):
            value = tuple(value)
        return dataclasses.replace(cfg, **{path[0]: value})
    return dataclasses.replace(cfg, **{path[0]: _set(getattr(cfg, path[0]), path[1:], value)})


__all__ = ["OptimConfig", "TrainConfig", "to_dict", "from_dict", "override", "field"]

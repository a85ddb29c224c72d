"""Build a method from a RunConfig and train it with the generic trainer."""

from __future__ import annotations

import os
from pathlib import Path

from onestep.data import load_for_model
from training.presets import RunConfig
from training.trainer import Trainer


def build_method(rc: RunConfig):
    """The method of `rc` with its teacher (our checkpoint or a diffusers folder, through
    `onestep.checkpoint.load_teacher`) and its real data (`rc.data`) when it needs them. Data must match the
    images the teacher (or, for teacher training, the configured network) works on: see
    `onestep.data.load_for_model` for the policy and the errors."""
    from training.methods import METHODS

    if rc.method not in METHODS:
        raise KeyError(f"unknown method {rc.method!r}; available: {', '.join(sorted(METHODS))}")
    cls, _ = METHODS[rc.method]
    needs = cls.needs_for(rc.method_cfg) if hasattr(cls, "needs_for") else getattr(cls, "needs", ("data",))
    kwargs = {}
    if "teacher" in needs:
        from onestep.checkpoint import load_teacher

        if not rc.teacher:
            raise ValueError(f"method {rc.method!r} needs --teacher (a checkpoint or a diffusers model folder)")
        teacher, meta = load_teacher(rc.teacher)
        teacher.source_sha256 = meta.get("sha256")
        kwargs["teacher"] = teacher
    if "data" in needs:
        kwargs["data"] = load_for_model(rc.data, *_data_target(rc, kwargs.get("teacher")))
    return cls(rc.method_cfg, **kwargs)


def _data_target(rc: RunConfig, teacher) -> tuple:
    """(image_shape, split, who, num_classes) the real data of `rc` must fit."""
    if teacher is not None:
        from onestep.checkpoint import image_shape

        return (image_shape(teacher.spec), "train", f"the teacher {rc.teacher}",
                int(getattr(teacher, "num_classes", 0)))
    unet = getattr(rc.method_cfg, "unet", None)
    if unet is None:
        raise ValueError(f"method {rc.method!r} needs data but has neither a teacher nor a network config")
    return ((unet.channels, unet.resolution, unet.resolution), "train",
            "the network of this preset (method_cfg.unet.channels/resolution)", int(unet.num_classes))


def train(rc: RunConfig, run_dir: str | os.PathLike, resume: bool = True, device: str = "auto",
          metric_fn=None, progress: bool = True) -> dict:
    import torch

    torch.manual_seed(rc.train.seed)  # the initial weights are part of the recipe
    method = build_method(rc)
    trainer = Trainer(method, rc.train, Path(run_dir), device=device, run_config=rc.to_dict(),
                      metric_fn=metric_fn, progress=progress)
    if hasattr(method, "prepare"):
        method.prepare(trainer.rank)
    result = trainer.fit(resume=resume)
    result["model"] = str(trainer.run_dir / "model.safetensors")
    if (trainer.run_dir / "model-best.safetensors").exists():
        result["best_model"] = str(trainer.run_dir / "model-best.safetensors")
    return result


def export_state(run_dir: str | os.PathLike, state_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the product (EMA weights) of one saved training state as a model checkpoint, e.g. to evaluate a run
    at an earlier iteration: `onestep distill ... --export-state RUN/checkpoints/state-00000200 --out M.safetensors`."""
    import json

    rc = RunConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text())["run_config"])
    method = build_method(rc)
    trainer = Trainer(method, rc.train, Path(run_dir), device="cpu", run_config=rc.to_dict(), progress=False)
    trainer.load_state(Path(state_dir))
    return trainer.export(out)

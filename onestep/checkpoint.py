"""Model checkpoints: safetensors weights + a JSON sidecar (never pickle).

`<name>.safetensors` holds the weights and, in its header, the same metadata as `<name>.json`. The JSON
records what rebuilds the model (`model` spec), the sha256 of the weights file, the recipe and versions.
Loading verifies the hash, so a truncated or corrupted file is rejected with a clear message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from onestep.provenance import atomic_write_bytes, atomic_write_json, sha256_file, stamp

FORMAT = "onestep-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not describe a model this package can build."""


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


# --- model specs -> modules ---------------------------------------------------------------------------------
_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}


def register_model_kind(kind: str):
    def deco(fn):
        _BUILDERS[kind] = fn
        return fn
    return deco


@register_model_kind("edm-denoiser")
def _build_edm(spec: dict) -> nn.Module:
    from onestep.denoiser import EDMDenoiser
    from onestep.nets import UNetConfig, build_unet

    cfg = UNetConfig.from_dict(spec["unet"])
    return EDMDenoiser(build_unet(cfg), spec.get("sigma_data", 0.5), cfg.num_classes,
                       spec.get("sigma_min", 0.002), spec.get("sigma_max", 80.0))


@register_model_kind("diffusers-denoiser")
def _build_diffusers(spec: dict) -> nn.Module:
    """A diffusers UNet2DModel (from spec["unet_config"]) + the alphas_cumprod of spec["scheduler"]
    ({"class_name", "config"}), as a DiffusersEpsDenoiser; see onestep.importer for the spec fields."""
    from onestep.importer import build_diffusers_denoiser

    return build_diffusers_denoiser(spec)


DENOISER_KINDS = ("edm-denoiser", "diffusers-denoiser")


@register_model_kind("one-step-generator")
def _build_generator(spec: dict) -> nn.Module:
    from onestep.denoiser import OneStepGenerator

    return OneStepGenerator(build_model(spec["denoiser"]), spec["sigma_g"])


def build_model(spec: dict) -> nn.Module:
    kind = spec.get("kind")
    if kind not in _BUILDERS:
        # other kinds (classifier, method-specific generators) register themselves on import
        import importlib

        for mod in ("onestep.classifier", "training.methods"):
            importlib.import_module(mod)
    if kind not in _BUILDERS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[kind](spec)


def image_shape(spec: dict) -> tuple[int, int, int]:
    """(C, H, W) of the images a model spec works on (generators nest their denoiser's spec)."""
    while "denoiser" in spec:
        spec = spec["denoiser"]
    if "unet" in spec:
        u = spec["unet"]
        return (u["channels"], u["resolution"], u["resolution"])
    return tuple(spec["image_shape"])


def class_names(meta: dict, num_classes: int, _depth: int = 0) -> list[str]:
    """The names of a model's classes, from its metadata (what a served model shows its users).

    In order: an explicit `class_names` list in the metadata (one name per class); a student follows its
    teacher's checkpoint (`run_config.teacher`, when that file can be read; a diffusers folder teacher is
    foreign, so `class k` unless named explicitly); a model trained here on Fashion-MNIST (`run_config.data`,
    10 classes, 1 channel) gets the dataset's names; anything else is `class k`. Unconditional: no names."""
    from onestep.data import FASHION_MNIST_CLASSES

    given = meta.get("class_names")
    if given is not None:
        if not isinstance(given, (list, tuple)) or len(given) != num_classes:
            raise CheckpointError(f"class_names must list {num_classes} names (one per class), got {given!r:.200}")
        return [str(x) for x in given]
    if not num_classes:
        return []
    numbered = [f"class {k}" for k in range(num_classes)]
    rc = meta.get("run_config") or {}
    teacher = rc.get("teacher")
    if teacher:
        if not str(teacher).endswith(".safetensors"):
            return numbered
        if _depth < 4:
            try:
                return class_names(read_metadata(teacher, verify=False), num_classes, _depth + 1)
            except (CheckpointError, OSError, ValueError):
                pass  # the teacher is not here: judge by this model's own record
    try:
        channels = image_shape(meta.get("model") or {})[0]
    except (KeyError, TypeError, IndexError):
        channels = None
    if rc.get("data") in ("fashion-mnist", "fmnist") and num_classes == 10 and channels == 1:
        return list(FASHION_MNIST_CLASSES)
    return numbered


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, verify: bool = True) -> tuple[nn.Module, dict]:
    """A multi-step teacher D(x, sigma, labels) from our checkpoint file (kind edm-denoiser or diffusers-denoiser)
    or from a local diffusers folder (pipeline folder with model_index.json, unet/ and scheduler/, or a bare UNet
    folder with scheduler_config.json beside config.json). Returns (denoiser in eval mode, meta); for a folder
    meta["sha256"] is a hash over its weight files and meta["source"] its provenance."""
    path = Path(path)
    if path.is_dir():
        from onestep.importer import load_diffusers_folder

        model, meta = load_diffusers_folder(path)
    else:
        model, meta = load_model(path, verify=verify)
        kind = meta["model"].get("kind")
        if kind not in DENOISER_KINDS:
            raise CheckpointError(f"{path} holds a {kind!r} model; a teacher is one of {DENOISER_KINDS}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), meta


def denoiser_spec(denoiser: nn.Module) -> dict:
    """The spec of an EDMDenoiser built by this package (what `build_model` needs to rebuild it)."""
    spec = getattr(denoiser, "spec", None)
    if spec is None:
        raise CheckpointError(f"{type(denoiser).__name__} carries no build spec")
    return spec


# --- save / load ----------------------------------------------------------------------------------------
def save_model(path: str | os.PathLike, model: nn.Module, spec: dict, extra: dict[str, Any] | None = None,
               dtype: torch.dtype | None = None) -> dict:
    """Save weights (optionally cast, e.g. fp16 for shipping) + sidecar. Returns the sidecar dict."""
    from safetensors.torch import save

    path = Path(path)
    sd = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().cpu()
          for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": spec, "dtype": str(dtype or "as-trained"), **(extra or {})}
    blob = save(sd, metadata={"onestep": json.dumps(meta, sort_keys=True, default=str)})
    atomic_write_bytes(path, blob)
    sidecar = {**meta, "weights_file": path.name, "sha256": sha256_file(path),
               "num_parameters": sum(v.numel() for v in sd.values()), **stamp()}
    atomic_write_json(sidecar_path(path), sidecar)
    return sidecar


def read_metadata(path: str | os.PathLike, verify: bool = True) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = sidecar_path(path)
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"sidecar {side} is not valid JSON: {e}") from e
        if verify and meta.get("sha256") and sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 in {side.name}: the file is corrupt, "
                                  f"truncated or was replaced")
        return meta
    # no sidecar: fall back to the metadata stored in the safetensors header
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if "onestep" not in header:
        raise CheckpointError(f"{path} has neither a JSON sidecar nor onestep metadata in its header")
    return json.loads(header["onestep"])


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               verify: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model described by the checkpoint's metadata and load its weights (eval mode)."""
    meta = read_metadata(path, verify)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    model = build_model(meta["model"])
    state = load_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model spec (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model.spec = meta["model"]
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), meta

"""diffusers teachers: read a local diffusers folder, build a `DiffusersEpsDenoiser`, convert it to a checkpoint.

Accepted folders (nothing is downloaded):
  pipeline folder: model_index.json, unet/config.json + weights, scheduler/scheduler_config.json
  bare UNet folder: config.json + weights, with a scheduler_config.json beside them
Weights: diffusion_pytorch_model.safetensors or .bin (or sharded with an .index.json), or the fp16 variant
(diffusion_pytorch_model.fp16.safetensors / .fp16.bin) when no full-precision file is there; fp16 or fp32.
The UNet must be a pixel-space UNet2DModel; the scheduler a DDPMScheduler or DDIMScheduler.

Checkpoint spec (model kind "diffusers-denoiser"):
  {"kind": "diffusers-denoiser", "unet_config": {...UNet2DModel config...},
   "scheduler": {"class_name": "DDPMScheduler" | "DDIMScheduler", "config": {...}},
   "prediction_type": "epsilon" | "v_prediction" | "sample", "num_classes": int, "image_shape": [C, H, W],
   "source": {...provenance...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from onestep.checkpoint import FORMAT, CheckpointError

KIND = "diffusers-denoiser"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
WEIGHTS_STEM = "diffusion_pytorch_model"
DEFAULT_STEPS = 10
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_TOLERANCE = 1e-3


def json_safe_config(config) -> dict:
    """A diffusers config (FrozenDict) as a plain JSON dict: private `_` keys dropped, tuples as lists."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not str(k).startswith("_")},
                                 default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _listing(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file: {e}") from e


def _weight_files(unet_dir: Path) -> tuple[list[Path], str | None, bool]:
    """(files diffusers will read, variant, use_safetensors): full precision first, then the fp16 variant;
    safetensors before .bin within each (diffusers' own preference)."""
    for variant in (None, "fp16"):
        mid = f".{variant}" if variant else ""
        for ext, safe in (("safetensors", True), ("bin", False)):
            single = unet_dir / f"{WEIGHTS_STEM}{mid}.{ext}"
            if single.is_file():
                return [single], variant, safe
            index = unet_dir / f"{WEIGHTS_STEM}{mid}.{ext}.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                missing = [s for s in shards if not (unet_dir / s).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are missing: {missing[:5]}")
                return [index] + [unet_dir / s for s in shards], variant, safe
    raise CheckpointError(f"no UNet weights in {unet_dir}: expected {WEIGHTS_STEM}.safetensors or "
                          f"{WEIGHTS_STEM}.bin (or their .fp16 variants, or a sharded .index.json); "
                          f"found {_listing(unet_dir)}")


def weights_dtype(files: Sequence[Path]) -> str:
    """The floating-point precision stored in the weight files ("float16", "float32", "bfloat16", or "mixed");
    diffusers itself upcasts to float32 on load, so this is read from the files."""
    found: set[str] = set()
    for f in files:
        f = Path(f)
        if f.name.endswith(".index.json"):
            continue
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            names = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64"}
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    dt = h.get_slice(k).get_dtype()
                    if dt in names:
                        found.add(names[dt])
        else:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            found.update(str(v.dtype).replace("torch.", "") for v in state.values()
                         if torch.is_tensor(v) and v.is_floating_point())
    return found.pop() if len(found) == 1 else ("mixed" if found else "float32")


def folder_sha256(files: Sequence[Path], root: Path) -> str:
    """sha256 over the weight files: sha256 of the lines 'path/relative/to/root <sha256 of file>' in path order
    (root = the UNet folder, so the same weights hash the same in a pipeline or a bare UNet folder)."""
    from onestep.provenance import sha256_file

    lines = sorted(f"{Path(f).relative_to(root).as_posix()} {sha256_file(f)}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def inspect_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Check a diffusers folder's layout and classes; say what was expected and what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusers model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (a diffusers pipeline or UNet folder was expected)")
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else None
    if index is not None or (path / "unet").is_dir():
        layout, unet_dir, sched_file = "pipeline", path / "unet", path / "scheduler" / "scheduler_config.json"
        if index is not None:
            latent = [k for k in ("vae", "vqvae", "text_encoder") if index.get(k)]
            if latent:
                raise CheckpointError(f"{path} is a latent or text-conditioned pipeline ({', '.join(latent)} in "
                                      f"model_index.json): only pixel-space UNet2DModel pipelines are supported")
            cls = (index.get("unet") or [None, None])[-1]
            if cls is not None and cls != "UNet2DModel":
                raise CheckpointError(f"{path}: model_index.json names a {cls} unet; expected UNet2DModel")
        if not (unet_dir / "config.json").is_file():
            raise CheckpointError(f"pipeline folder {path}: expected unet/config.json; found {_listing(path)} "
                                  f"and unet/ {_listing(unet_dir)}")
        if not sched_file.is_file():
            raise CheckpointError(f"pipeline folder {path}: expected scheduler/scheduler_config.json; found "
                                  f"{_listing(path)} and scheduler/ {_listing(path / 'scheduler')}")
    elif (path / "config.json").is_file():
        layout, unet_dir, sched_file = "unet", path, path / "scheduler_config.json"
        if not sched_file.is_file():
            raise CheckpointError(f"UNet folder {path}: expected scheduler_config.json beside config.json (the "
                                  f"noise schedule the UNet was trained with); found {_listing(path)}")
    else:
        raise CheckpointError(f"{path} is not a diffusers folder: expected model_index.json with unet/ and "
                              f"scheduler/, or a UNet folder with config.json and scheduler_config.json; found "
                              f"{_listing(path)}")
    unet_cfg = _read_json(unet_dir / "config.json")
    cls = unet_cfg.get("_class_name")
    if cls is not None and cls != "UNet2DModel" or "cross_attention_dim" in unet_cfg:
        raise CheckpointError(f"{unet_dir / 'config.json'} describes a {cls or 'cross-attention UNet'}; expected "
                              f"UNet2DModel (a pixel-space, unconditional or class-conditional DDPM UNet)")
    sched_cfg = _read_json(sched_file)
    sched_cls = sched_cfg.get("_class_name") or ((index or {}).get("scheduler") or [None, None])[-1]
    if sched_cls not in SCHEDULERS:
        raise CheckpointError(f"{sched_file}: scheduler class {sched_cls!r} is not supported; expected one of "
                              f"{', '.join(SCHEDULERS)}")
    files, variant, safe = _weight_files(unet_dir)
    return {"path": path, "layout": layout, "unet_dir": unet_dir, "unet_config": unet_cfg,
            "scheduler_class": sched_cls, "scheduler_config": sched_cfg, "weight_files": files,
            "variant": variant, "use_safetensors": safe}


def make_scheduler(class_name: str, config: dict):
    """Instantiate the named diffusers scheduler from its config (DDPMScheduler or DDIMScheduler)."""
    import diffusers

    if class_name not in SCHEDULERS:
        raise CheckpointError(f"scheduler class {class_name!r} is not supported; expected one of {SCHEDULERS}")
    return getattr(diffusers, class_name).from_config(config)


def ddim_settings(scheduler_config: dict) -> dict:
    """The DDIMScheduler settings DDIMPipeline runs with (it converts any scheduler with from_config)."""
    from diffusers import DDIMScheduler

    from onestep.samplers import ddim_config

    with _quiet_diffusers():
        cfg = DDIMScheduler.from_config(scheduler_config).config
    out = ddim_config({k: cfg.get(k) for k in ("num_train_timesteps", "timestep_spacing", "steps_offset",
                                               "clip_sample", "clip_sample_range", "set_alpha_to_one",
                                               "thresholding")})
    out.update(prediction_type=cfg.get("prediction_type", "epsilon"),
               rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
               beta_schedule=cfg.get("beta_schedule"), beta_start=cfg.get("beta_start"), beta_end=cfg.get("beta_end"))
    return out


def build_diffusers_denoiser(spec: dict, unet: torch.nn.Module | None = None):
    """spec -> DiffusersEpsDenoiser (a fresh UNet2DModel.from_config unless `unet` is given); `.spec` is set."""
    from diffusers import UNet2DModel

    from onestep.denoiser import DiffusersEpsDenoiser

    if unet is None:
        unet = UNet2DModel.from_config(spec["unet_config"])
    sched = spec["scheduler"]
    scheduler = make_scheduler(sched["class_name"], sched["config"])
    settings = ddim_settings(sched["config"])
    den = DiffusersEpsDenoiser(unet, scheduler.alphas_cumprod, spec["prediction_type"],
                               spec.get("num_classes"), scheduler_config=settings)
    den.spec = spec
    return den


def make_spec(unet_config: dict, scheduler_class: str, scheduler_config: dict, source: dict | None = None) -> dict:
    """The "diffusers-denoiser" spec of a UNet2DModel config + scheduler (JSON-safe)."""
    ucfg = json_safe_config(unet_config)
    scfg = json_safe_config(scheduler_config)
    size = ucfg.get("sample_size")
    if size is None:
        raise CheckpointError("UNet config has no sample_size: the image shape is unknown")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return {"kind": KIND, "unet_config": ucfg, "scheduler": {"class_name": scheduler_class, "config": scfg},
            "prediction_type": ddim_settings(scfg)["prediction_type"],
            "num_classes": int(ucfg.get("num_class_embeds") or 0),
            "image_shape": [int(ucfg.get("in_channels", 3)), int(h), int(w)], "source": source or {}}


class _quiet_diffusers:
    """diffusers' advisory log lines (accelerate, ignored config keys) lowered to errors only, then restored."""

    def __enter__(self):
        from diffusers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self._level)


def load_diffusers_folder(path: str | os.PathLike):
    """A diffusers folder -> (DiffusersEpsDenoiser in float32 eval mode, meta). meta["sha256"] hashes the weights."""
    from diffusers import UNet2DModel

    info = inspect_folder(path)
    try:
        with _quiet_diffusers():
            unet = UNet2DModel.from_pretrained(info["unet_dir"], local_files_only=True, variant=info["variant"],
                                               use_safetensors=info["use_safetensors"])
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
        raise CheckpointError(f"diffusers could not load the UNet in {info['unet_dir']}: {e}") from e
    root = info["path"]
    digest = folder_sha256(info["weight_files"], info["unet_dir"])
    source = {"path": str(Path(root).resolve()), "layout": info["layout"], "sha256": digest,
              "weight_files": [Path(f).relative_to(root).as_posix() for f in info["weight_files"]],
              "weights_dtype": weights_dtype(info["weight_files"]), "unet_class": "UNet2DModel",
              "scheduler_class": info["scheduler_class"],
              "diffusers_version": info["unet_config"].get("_diffusers_version")}
    spec = make_spec(unet.config, info["scheduler_class"], info["scheduler_config"], source)
    den = build_diffusers_denoiser(spec, unet.float()).eval().requires_grad_(False)
    source["ddim_settings"] = den.scheduler_config
    meta = {"format": FORMAT, "model": spec, "sha256": digest, "source": source}
    return den, meta


# --- parity against diffusers --------------------------------------------------------------------------------
def reference_ddim(unet, scheduler_class: str, scheduler_config: dict, x_T: torch.Tensor, steps: int,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """DDIMPipeline's loop written out around diffusers' own DDIMScheduler.step (eta 0), passing class labels and
    keeping the first C channels of a learned-variance UNet; returns the sample before `/ 2 + 0.5` and clamp."""
    from diffusers import DDIMScheduler

    with _quiet_diffusers():
        sched = DDIMScheduler.from_config(make_scheduler(scheduler_class, scheduler_config).config)
    sched.set_timesteps(steps)
    x = x_T.clone()
    c = x.shape[1]
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t, class_labels=labels).sample[:, :c]
            x = sched.step(out, t, x, eta=0.0).prev_sample
    return x


def pipeline_ddim(unet, scheduler_class: str, scheduler_config: dict, seeds: Sequence[int], steps: int):
    """diffusers' DDIMPipeline itself, one generator per seed; its output image in [0, 1] (NCHW)."""
    from diffusers import DDIMPipeline

    with _quiet_diffusers():
        pipe = DDIMPipeline(unet, make_scheduler(scheduler_class, scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        return pipe(batch_size=len(seeds), generator=gens, num_inference_steps=steps, eta=0.0,
                    output_type="pt").images


def measure_parity(denoiser, steps: int = DEFAULT_STEPS, seeds: Sequence[int] = DEFAULT_SEEDS) -> dict:
    """max|ours - diffusers| of `sample(..., noise_convention="diffusers")`, relative to the image scale.

    step_loop: against `reference_ddim` before the final clamp, divided by max|reference| (the image scale).
    pipeline: against DDIMPipeline's [0, 1] output (scale 1), for UNets it can run (unconditional, C outputs).
    """
    from onestep.samplers import diffusers_noise, sample

    spec = denoiser.spec
    shape = tuple(spec["image_shape"])
    seeds = [int(s) for s in seeds]
    z = diffusers_noise(seeds, shape)
    n_cls = int(denoiser.num_classes)
    labels = torch.arange(len(seeds)) % n_cls if n_cls else None
    sched = spec["scheduler"]
    ours = sample(denoiser, z, labels, "ddim", steps, noise_convention="diffusers")
    ref = reference_ddim(denoiser.unet, sched["class_name"], sched["config"], z, steps, labels)
    scale = max(float(ref.abs().max()), 1e-12)
    err = float((ours - ref).abs().max())
    res = {"steps": steps, "seeds": seeds, "labels": None if labels is None else labels.tolist(),
           "step_loop": {"reference": "diffusers DDIMScheduler.step loop (pre-clamp)", "max_abs_err": err,
                         "scale": scale, "rel_err": err / scale}}
    worst = err / scale
    if not n_cls and not denoiser.learned_variance:
        img = pipeline_ddim(denoiser.unet, sched["class_name"], sched["config"], seeds, steps)
        perr = float(((ours / 2 + 0.5).clamp(0, 1) - img).abs().max())
        res["pipeline"] = {"reference": "diffusers DDIMPipeline (output in [0, 1])", "max_abs_err": perr,
                           "scale": 1.0, "rel_err": perr}
        worst = max(worst, perr)
    else:
        res["pipeline"] = None  # DDIMPipeline passes no class labels and cannot split learned-variance outputs
    res["rel_err"] = worst
    return res


def import_folder(folder: str | os.PathLike, out: str | os.PathLike, steps: int = DEFAULT_STEPS,
                  seeds: Sequence[int] = DEFAULT_SEEDS, tolerance: float = DEFAULT_TOLERANCE,
                  dtype: str = "source") -> dict:
    """Folder -> checkpoint of kind "diffusers-denoiser" + measured DDIM parity (in the sidecar as "parity").

    dtype: "source" keeps the folder's weight precision (fp16 stays fp16, losslessly), or "fp32" / "fp16".
    Raises CheckpointError (after writing nothing) when the parity error exceeds `tolerance`.
    """
    from onestep.checkpoint import save_model

    den, meta = load_diffusers_folder(folder)
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    parity = measure_parity(den, steps, seeds)
    parity["tolerance"] = tolerance
    if not parity["rel_err"] <= tolerance:
        raise CheckpointError(f"{folder}: DDIM parity error {parity['rel_err']:.3g} (relative to the image scale) "
                              f"exceeds {tolerance:g}: {json.dumps(parity)}")
    src = meta["source"]["weights_dtype"]
    choice = {"source": src, "fp32": "float32", "fp16": "float16"}.get(dtype)
    if choice is None:
        raise ValueError(f"dtype must be source, fp32 or fp16, not {dtype!r}")
    save_dtype = torch.float16 if choice == "float16" else torch.float32
    extra = {"method": "diffusers-import", "source": meta["source"], "parity": parity}
    return save_model(out, den, den.spec, extra=extra, dtype=save_dtype)

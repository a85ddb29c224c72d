"""`onestep` console command: one subcommand per verb. Heavy imports happen inside each verb."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DATA_HELP = ("real images for methods that use them (teacher training, SiDA's discriminator): 'fashion-mnist', "
             "a .npz (array 'images' N,H,W[,C] or N,C,H,W uint8, optional 'labels') or an image folder "
             "(root/*.png, or root/<class>/*.png for labels). Channels and size must equal the teacher's: user "
             "data is never resized (Fashion-MNIST is zero-padded from 28x28)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="named recipe (see `onestep presets`)")
    p.add_argument("--run-dir", required=True, help="folder for checkpoints, logs, sample grids, model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 --set method_cfg.optim.lr=1e-4")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has checkpoints")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--metric", choices=["none", "classifier"], default="none",
                   help="periodic sample-quality metric (classifier = fast Fashion-MNIST feature KID)")
    p.add_argument("--data", default=None, help=DATA_HELP)


def _run_config(args):
    from onestep.config import override
    from training.presets import get_preset

    rc = get_preset(args.preset)
    if getattr(args, "teacher", None):
        import dataclasses
        rc = dataclasses.replace(rc, teacher=args.teacher)
    if getattr(args, "data", None):
        import dataclasses
        rc = dataclasses.replace(rc, data=args.data)
    if args.overrides:
        rc = override(rc, args.overrides)
    return rc


def _fmnist_shaped(teacher: str | None) -> bool:
    """True when `teacher` is one of our checkpoints of 1x32x32 images (the classifier metric's domain)."""
    from onestep.checkpoint import CheckpointError, image_shape, read_metadata

    if not teacher or not Path(teacher).is_file():
        return False
    try:
        return tuple(image_shape(read_metadata(teacher, verify=False)["model"])) == (1, 32, 32)
    except (CheckpointError, KeyError, TypeError, ValueError):
        return False


def _metric_fn(name: str):
    if name == "none":
        return None
    from onestep.metrics import classifier_kid_fn

    return classifier_kid_fn()


def cmd_train(args) -> int:
    from training.run import train

    rc = _run_config(args)
    res = train(rc, args.run_dir, resume=not args.no_resume, device=args.device, metric_fn=_metric_fn(args.metric))
    print(json.dumps(res, indent=2))
    return 0


def cmd_distill(args) -> int:
    from training.run import export_state, train

    if args.export_state:
        if not args.out:
            raise ValueError("--export-state needs --out MODEL.safetensors")
        print(export_state(args.run_dir, args.export_state, args.out))
        return 0

    if args.preset is None:
        args.preset = f"fmnist-{args.method}"
    rc = _run_config(args)
    if rc.method != args.method:
        raise ValueError(f"preset {args.preset!r} is for method {rc.method!r}, not {args.method!r}")
    metric = args.metric if args.metric != "auto" else "classifier" if _fmnist_shaped(rc.teacher) else "none"
    res = train(rc, args.run_dir, resume=not args.no_resume, device=args.device, metric_fn=_metric_fn(metric))
    print(json.dumps(res, indent=2))
    return 0


def cmd_presets(args) -> int:
    from training.presets import PRESETS

    for name, rc in sorted(PRESETS.items()):
        print(f"{name:24s} method={rc.method:18s} steps={rc.train.steps} batch={rc.train.batch_size}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from onestep.checkpoint import DENOISER_KINDS, image_shape, load_model, load_teacher
    from onestep.data import to_uint8
    from onestep.images import save_grid
    from onestep.noise import parse_seeds, seeded_noise, seeded_noise_steps
    from onestep.samplers import churn_from_args, diffusers_noise, sample, sample_onestep

    model, meta = load_teacher(args.model) if Path(args.model).is_dir() else load_model(args.model)
    seeds = parse_seeds(args.seeds)
    shape = image_shape(meta["model"])
    is_denoiser = meta["model"]["kind"] in DENOISER_KINDS
    if args.noise_convention == "diffusers":
        if not is_denoiser:
            raise ValueError("--noise-convention diffusers reproduces diffusers' DDIMPipeline: it needs a diffusers "
                             "teacher (an imported checkpoint or a diffusers folder), not a one-step generator")
        z = diffusers_noise(seeds, shape)
    else:
        z = torch.from_numpy(seeded_noise(seeds, shape))
    n_cls = getattr(model, "num_classes", 0)
    labels = None
    if n_cls:
        labels = torch.tensor([args.label] * len(seeds)) if args.label is not None else torch.arange(len(seeds)) % n_cls
    sampler = args.sampler or ("ddim" if args.noise_convention == "diffusers" else "heun")
    sde = {}
    if sampler == "heun-sde":
        sde = {"churn": churn_from_args(args),
               "churn_noise": torch.from_numpy(seeded_noise_steps(seeds, shape, args.steps))}
    with torch.no_grad():
        if is_denoiser:
            x = sample(model, z, labels, sampler, args.steps, args.schedule, progress=True,
                       noise_convention=args.noise_convention, **sde)
        else:
            x = sample_onestep(model, z, labels)
    imgs = to_uint8(x.numpy())
    out = Path(args.out)
    if out.suffix == ".png":
        save_grid(out, imgs, nrow=args.nrow)
    else:
        np.savez(out, images=imgs, seeds=np.asarray(seeds), labels=None if labels is None else labels.numpy())
    print(f"wrote {len(seeds)} images to {out}")
    return 0


def cmd_import(args) -> int:
    from onestep.importer import import_folder

    side = import_folder(args.folder, args.out, steps=args.steps, seeds=args.seeds, tolerance=args.tolerance,
                         dtype=args.dtype)
    print(json.dumps({"checkpoint": args.out, "sha256": side["sha256"], "source": side["source"]["path"],
                      "source_sha256": side["source"]["sha256"], "parity": side["parity"]}, indent=2))
    return 0


def cmd_train_classifier(args) -> int:
    from onestep.classifier import train_classifier

    print(json.dumps(train_classifier(args.out, epochs=args.epochs), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from onestep import __version__

    ap = argparse.ArgumentParser(prog="onestep", description="Distil diffusion teachers into one-step "
                                 "generators, export them, serve them behind Triton and benchmark them.")
    ap.add_argument("--version", action="version", version=f"onestep {__version__}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("train", help="train a teacher (EDM) from a preset", description="Train a diffusion "
                       "teacher with the EDM loss. Resumes from the run folder's latest checkpoint.")
    _add_run_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("distill", help="distil a teacher into a one-step student",
                       description="Distil a teacher checkpoint into a one-step generator with one of the methods "
                                   "(denoising-student, sid, sida, emd, sferd, adv-kd). Resumes from the run folder.")
    p.add_argument("--method", required=True, help="denoising-student | sid | sida | emd | sferd | adv-kd")
    p.add_argument("--teacher", default=None, help="teacher: our checkpoint (.safetensors) or a diffusers model "
                   "folder (default: the preset's, the shipped teacher)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--preset", default=None, help="named recipe (default: fmnist-METHOD)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--metric", choices=["auto", "none", "classifier"], default="auto",
                   help="periodic sample-quality metric (fast Fashion-MNIST classifier KID); auto = classifier "
                        "for a 1x32x32 teacher checkpoint, none for other teachers")
    p.add_argument("--export-state", default=None, metavar="STATE_DIR",
                   help="do not train: write the EMA product of this saved state of RUN_DIR to --out")
    p.add_argument("--out", default=None, help="output checkpoint for --export-state")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("demo", help="end to end: shipped teacher + student -> ONNX -> Triton -> HTTP request",
                       description=__import__("onestep.demo", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps of the served teacher baseline")
    p.set_defaults(fn=lambda a: (__import__("onestep.demo", fromlist=["x"]).run_demo(a.out, a.teacher_steps), 0)[1])

    p = sub.add_parser("presets", help="list named presets")
    p.set_defaults(fn=cmd_presets)

    from onestep.samplers import add_churn_arguments

    p = sub.add_parser("sample", help="sample images from a teacher or student checkpoint")
    p.add_argument("--model", required=True, help="checkpoint (.safetensors with JSON sidecar) or a diffusers folder")
    p.add_argument("--seeds", default="0-39", help="e.g. 0-39 or 1,5,9")
    p.add_argument("--label", type=int, default=None, help="class label for all images (default: cycle classes)")
    p.add_argument("--sampler", default=None, choices=["heun", "heun-sde", "euler", "ddim"],
                   help="default heun (ddim with --noise-convention diffusers); heun-sde: EDM's stochastic sampler "
                        "(Algorithm 2), its per-step noise drawn from each image's seed")
    add_churn_arguments(p)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--schedule", default=None,
                   help="karras (default) | loglinear | ddim-uniform | ddim-quadratic | ddim-trailing")
    p.add_argument("--noise-convention", default="ours", choices=["ours", "diffusers"],
                   help="ours: numpy seeded unit noise z, x = sigma_0 z (the same seeds drive teacher and student); "
                        "diffusers: reproduce diffusers' DDIMPipeline exactly (torch generator per seed, the "
                        "scheduler config's timesteps); see docs/teachers.md")
    p.add_argument("--nrow", type=int, default=10)
    p.add_argument("--out", required=True, help="grid .png or .npz of uint8 images")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("import", help="convert a diffusers DDPM/DDIM folder into a teacher checkpoint",
                       description="Convert a local diffusers folder (pipeline folder with model_index.json, unet/ "
                                   "and scheduler/, or a UNet folder with scheduler_config.json) into a checkpoint "
                                   "of kind diffusers-denoiser, then measure max|ours - diffusers DDIM| relative to "
                                   "the image scale and store it in the checkpoint's metadata.")
    p.add_argument("folder", help="diffusers folder")
    p.add_argument("--out", required=True, help="output checkpoint .safetensors (sidecar written beside it)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the parity check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the parity check")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="fail above this parity error (relative to the image scale)")
    p.add_argument("--dtype", default="source", choices=["source", "fp32", "fp16"],
                   help="weight precision stored (source: as in the folder)")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("train-classifier", help="train the fast Fashion-MNIST feature classifier")
    p.add_argument("--out", default="artifacts/fmnist-classifier.safetensors")
    p.add_argument("--epochs", type=int, default=2)
    p.set_defaults(fn=cmd_train_classifier)

    from benchmarks import quality

    p = sub.add_parser("evaluate", help="sample quality vs NFE (classifier and Inception KID/FID)",
                       description=quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_arguments(p)
    p.set_defaults(fn=quality.run)

    from benchmarks import latency

    p = sub.add_parser("bench", help="latency/throughput: student vs teacher across backends",
                       description=latency.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_arguments(p)
    p.set_defaults(fn=latency.main_args)

    from exporters.cli import register as register_export
    from serving.cli import register as register_serving

    register_export(sub)
    register_serving(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        from exporters.onnx_export import ExportError
        from onestep.checkpoint import CheckpointError
        from onestep.data import DataError
        from serving.triton_server import TritonError

        if isinstance(e, (CheckpointError, DataError, ExportError, TritonError, ValueError, KeyError,
                          FileNotFoundError, FloatingPointError)):
            print(f"onestep {args.verb}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

"""Quality vs NFE: sample a teacher (several samplers and step counts) or a student (1 NFE) with fixed seeds
and class-balanced labels, and score the images in the Inception and/or classifier feature spaces.

    python -m benchmarks.quality --model artifacts/fmnist-teacher.safetensors --n 500 \
        --points euler:1,euler:2,euler:4,euler:8,heun:9,heun:18,euler:100 --inception-points heun:18,euler:1 \
        --out benchmarks/results/teacher_quality
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

EVAL_SEED0 = 1_000_000  # evaluation seeds never overlap the sample-grid seeds


def parse_points(spec: str) -> list[tuple[str, int]]:
    """'euler:1,heun:18' -> [('euler', 1), ('heun', 18)] (sampler:steps; 'onestep' needs no steps)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = item.partition(":")
        out.append((name, int(steps) if steps else 1))
    return out


def generate(model, meta: dict, sampler: str, steps: int, n: int, batch: int = 250, schedule: str = "karras",
             churn=None):
    """n images from seeds EVAL_SEED0.. with labels i % classes; heun-sde draws its per-step noise from the same
    seeds (`seeded_noise_steps`) with `churn` (default `Churn()`)."""
    import torch

    from onestep.checkpoint import image_shape
    from onestep.data import to_uint8
    from onestep.noise import seeded_noise, seeded_noise_steps
    from onestep.samplers import sample

    shape = image_shape(meta["model"])
    n_cls = getattr(model, "num_classes", 0)
    imgs, labs = [], []
    t0 = time.time()
    for i in range(0, n, batch):
        seeds = range(EVAL_SEED0 + i, EVAL_SEED0 + min(n, i + batch))
        z = torch.from_numpy(seeded_noise(seeds, shape))
        labels = torch.arange(i, i + len(seeds)) % n_cls if n_cls else None
        if sampler == "onestep":
            with torch.no_grad():
                x = model(z, labels)
        elif sampler == "heun-sde":
            eps = torch.from_numpy(seeded_noise_steps(seeds, shape, steps))
            x = sample(model, z, labels, sampler, steps, schedule, churn_noise=eps, churn=churn)
        else:
            x = sample(model, z, labels, sampler, steps, schedule)
        imgs.append(to_uint8(x.numpy()))
        labs.append(None if labels is None else labels.numpy())
    return np.concatenate(imgs), (None if labs[0] is None else np.concatenate(labs)), time.time() - t0


def evaluate(model_path: str, points, n: int, inception_points=(), n_inception: int | None = None,
             grid_dir: Path | None = None, progress: bool = True, guidance: float = 1.0,
             blur_sigma: float = 3.0, churn=None) -> dict:
    from onestep.checkpoint import load_model
    from onestep.images import save_grid
    from onestep.metrics import ClassifierFeatures, InceptionFeatures, evaluate_images, real_baseline
    from onestep.samplers import Churn, nfe

    model, meta = load_model(model_path)
    if guidance != 1.0:  # the teacher with SFERD's attention guidance (what fmnist-sferd's targets are sampled from)
        from training.methods.attention_guidance import AttentionGuidedDenoiser

        model = AttentionGuidedDenoiser(model.float(), guidance, blur_sigma)
    clf = ClassifierFeatures()
    inc = InceptionFeatures() if inception_points else None
    n_inc = n_inception or n
    res = {"model": model_path, "model_sha256": meta.get("sha256"), "n": n, "n_inception": n_inc,
           "attention_guidance": {"w": guidance, "blur_sigma": blur_sigma} if guidance != 1.0 else None,
           "baselines": {"classifier": real_baseline(extractor=clf, n=n)}, "rows": []}
    if inc is not None:
        res["baselines"]["inception"] = real_baseline(extractor=inc, n=n_inc, progress=progress)
    for sampler, steps in points:
        k = nfe(sampler, steps)
        imgs, labels, secs = generate(model, meta, sampler, steps,
                                      max(n, n_inc if (sampler, steps) in inception_points else 0), churn=churn)
        row = {"sampler": sampler, "steps": steps, "nfe": k, "sample_seconds": secs}
        if sampler == "heun-sde":
            row["churn"] = dataclasses.asdict(churn or Churn())
        c = evaluate_images(imgs[:n], extractor=clf)
        row.update({"classifier_kid": c["kid"], "classifier_kid_std": c["kid_std"], "classifier_fd": c["fid"]})
        if labels is not None:
            row["class_agreement"] = float((clf.predict(imgs[:n]) == labels[:n]).mean())
        if inc is not None and (sampler, steps) in inception_points:
            m = evaluate_images(imgs[:n_inc], extractor=inc, progress=progress)
            row.update({"inception_fid": m["fid"], "inception_kid": m["kid"], "inception_kid_std": m["kid_std"]})
        if grid_dir is not None:
            save_grid(grid_dir / f"grid-{sampler}-{steps}.png", imgs[:40], nrow=10)
        res["rows"].append(row)
        if progress:
            print(json.dumps(row), flush=True)
    return res


def to_markdown(res: dict, title: str) -> str:
    b = res["baselines"]
    lines = [f"# {title}", "", f"Model: `{res['model']}` (sha256 {str(res.get('model_sha256'))[:12]})", "",
             f"Classifier-space metrics at N={res['n']}; Inception FID/KID at N={res['n_inception']} where shown.",
             f"Real-vs-real baseline (Fashion-MNIST test vs train, same N): classifier KID "
             f"{b['classifier']['kid']:.2f}, classifier FD {b['classifier']['fid']:.3f}"
             + (f"; Inception FID {b['inception']['fid']:.2f}, KID {b['inception']['kid']*1e3:.2f}e-3"
                if "inception" in b else "") + ".", "",
             "| sampler | steps | NFE | classifier KID | classifier FD | class agreement | Inception FID | "
             "Inception KID x1e3 | sampling s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        inc_fid = f"{r['inception_fid']:.2f}" if "inception_fid" in r else "-"
        inc_kid = f"{r['inception_kid']*1e3:.2f} ± {r['inception_kid_std']*1e3:.2f}" if "inception_kid" in r else "-"
        agree = f"{r['class_agreement']:.3f}" if "class_agreement" in r else "-"
        name = r["sampler"]
        if "churn" in r:
            c = r["churn"]
            name += f" (S_churn {c['S_churn']:g}, S_tmin {c['S_tmin']:g}, S_tmax {c['S_tmax']:g}, S_noise {c['S_noise']:g})"
        lines.append(f"| {name} | {r['steps']} | {r['nfe']} | {r['classifier_kid']:.2f} ± "
                     f"{r['classifier_kid_std']:.2f} | {r['classifier_fd']:.3f} | {agree} | {inc_fid} | {inc_kid} | "
                     f"{r['sample_seconds']:.1f} |")
    meta = res.get("run", {})
    lines += ["", f"Command: `{meta.get('command', '')}`", f"Machine: {meta.get('machine', '')}",
              f"Revision: {meta.get('git_revision', '')}", ""]
    return "\n".join(lines)


def render(json_path: str, title: str) -> str:
    """Rewrite STEM.md from STEM.json (e.g. after a change of the table layout)."""
    res = json.loads(Path(json_path).read_text())
    md = to_markdown(res, title)
    Path(json_path).with_suffix(".md").write_text(md)
    return md


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True)
    ap.add_argument("--points", default="onestep:1",
                    help="sampler:steps list (euler, heun, heun-sde, ddim, onestep)")
    ap.add_argument("--inception-points", default="", help="subset of --points also scored with Inception")
    ap.add_argument("--n", type=int, default=1000, help="images per point for the classifier metric")
    ap.add_argument("--n-inception", type=int, default=None, help="images per Inception point (default --n)")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json, STEM.md and grids in STEM-grids/")
    ap.add_argument("--title", default="Sample quality vs NFE")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="sample a teacher with SFERD's attention guidance eps_deg + w (eps - eps_deg) (1 = off)")
    ap.add_argument("--blur-sigma", type=float, default=3.0, help="blur of the attention guidance")
    from onestep.samplers import add_churn_arguments

    add_churn_arguments(ap)


def run(args) -> int:
    from onestep.provenance import atomic_write_bytes, atomic_write_json, git_revision, machine_info

    import torch

    torch.manual_seed(0)
    points = parse_points(args.points)
    inc_points = parse_points(args.inception_points)
    out = Path(args.out)
    from onestep.samplers import churn_from_args

    churn = churn_from_args(args)
    res = evaluate(args.model, points, args.n, inc_points, args.n_inception, grid_dir=Path(f"{out}-grids"),
                   guidance=args.guidance, blur_sigma=args.blur_sigma, churn=churn)
    res["run"] = {"command": " ".join(["onestep" if sys.argv[0].endswith("onestep") else "python -m benchmarks.quality"]
                                      + sys.argv[1:]),
                  "machine": machine_info(), "git_revision": git_revision(), "torch_threads": torch.get_num_threads()}
    atomic_write_json(f"{out}.json", res)
    atomic_write_bytes(f"{out}.md", to_markdown(res, args.title).encode())
    print(to_markdown(res, args.title))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

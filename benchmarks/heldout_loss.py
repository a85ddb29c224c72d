"""Held-out denoising loss of EDM denoisers: a cheap, unsaturated metric to choose among a teacher's weights
(EMA lengths, checkpoints) without sampling.

    python -m benchmarks.heldout_loss --model "404 kimg=artifacts/fmnist-teacher-attn.safetensors" \
        --model "anneal ema0.999=runs/teacher-attn-anneal/model.safetensors" --n 512 --out runs/heldout

For every model: the EDM training objective (Karras et al. 2022, Eq. 2, weighting lambda(sigma) =
(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 from Table 1) on images the teacher never trained on (the test
split), with the expectation over ln(sigma) ~ N(P_mean, P_std^2) replaced by a fixed quadrature: the mid-quantiles
of that normal (`--levels` of them, equal weight). Every model sees the same images, labels, sigmas and noise
(common random numbers), so the paired difference to the first model is far more precise than either loss;
its standard error is over images. Writes STEM.json and STEM.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


def sigma_levels(n: int, P_mean: float = -1.2, P_std: float = 1.2) -> np.ndarray:
    """The n mid-quantiles (k + 0.5) / n of ln(sigma) ~ N(P_mean, P_std^2), as sigmas (ascending)."""
    from statistics import NormalDist

    q = [(k + 0.5) / n for k in range(n)]
    return np.exp(np.array([P_mean + P_std * NormalDist().inv_cdf(p) for p in q]))


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # EDM Table 1, lambda(sigma)


@torch.no_grad()
def heldout_losses(denoiser, y: torch.Tensor, labels, sigmas: np.ndarray, seed: int = 0,
                   sigma_data: float = 0.5, batch: int = 256) -> np.ndarray:
    """Per-image, per-level weighted losses, shape (N, levels). The noise of level j for image i is drawn from
    one generator seeded by `seed`, in a fixed order, so that every denoiser gets identical inputs."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(sigmas), *y.shape), generator=gen)
    out = np.zeros((len(y), len(sigmas)))
    for j, s in enumerate(sigmas):
        s_t = torch.tensor(float(s))
        for a in range(0, len(y), batch):
            yb = y[a:a + batch]
            lb = labels[a:a + batch] if labels is not None else None
            x0_hat = denoiser(yb + noise[j, a:a + batch] * s_t, s_t.expand(len(yb)), lb).float()
            out[a:a + batch, j] = (edm_weight(s_t, sigma_data) * (x0_hat - yb) ** 2).flatten(1).mean(1).numpy()
    return out


def held_out_images(n: int, dataset: str = "fashion-mnist", seed: int = 0):
    """n test-split images in [-1, 1] with their labels, chosen by a seeded permutation."""
    from onestep.data import load_dataset, to_model_range

    ds = load_dataset(dataset, split="test")
    if n > len(ds):
        raise ValueError(f"--n {n} is more than the {len(ds)} held-out images")
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    y = torch.from_numpy(to_model_range(ds.images[idx]))
    labels = torch.from_numpy(ds.labels[idx]) if ds.labels is not None else None
    return y, labels


def compare(models: list[tuple[str, str]], n: int = 512, levels: int = 8, seed: int = 0, threads: int = 0) -> dict:
    from onestep.checkpoint import load_model

    if threads:
        torch.set_num_threads(threads)
    y, labels = held_out_images(n, seed=seed)
    sigmas = sigma_levels(levels)
    rows, ref = [], None
    for label, path in models:
        t0 = time.perf_counter()
        net, meta = load_model(path)
        sd = float(meta["model"].get("sigma_data", 0.5))
        per = heldout_losses(net, y, labels if getattr(net, "num_classes", 0) else None, sigmas, seed, sd)
        per_image = per.mean(1)
        if ref is None:
            ref = per_image
        diff = per_image - ref
        rows.append({"label": label, "path": path, "sha256": meta.get("sha256"), "loss": float(per_image.mean()),
                     "loss_se": float(per_image.std(ddof=1) / math.sqrt(n)),
                     "diff_vs_first": float(diff.mean()), "diff_se": float(diff.std(ddof=1) / math.sqrt(n)),
                     "per_level": [float(v) for v in per.mean(0)], "seconds": round(time.perf_counter() - t0, 1)})
    return {"n": n, "levels": levels, "sigmas": [float(s) for s in sigmas], "seed": seed,
            "dataset": "fashion-mnist test split", "rows": rows}


def report(res: dict, command: str) -> str:
    sig = ", ".join(f"{s:.3g}" for s in res["sigmas"])
    lines = [f"# Held-out denoising loss ({res['dataset']}, N={res['n']}, {res['levels']} sigma levels)", "",
             f"EDM loss (Eq. 2, Table 1 weighting) at the mid-quantiles of ln(sigma) ~ N(-1.2, 1.2^2): sigma = {sig}. "
             "Same images, labels, sigmas and noise for every model; the difference to the first row is paired "
             "(standard errors over images). Lower is better.", "",
             "| weights | loss | difference vs first row | per level (low sigma to high) |", "|---|---|---|---|"]
    for r in res["rows"]:
        lv = " / ".join(f"{v:.4f}" for v in r["per_level"])
        lines.append(f"| {r['label']} | {r['loss']:.5f} ± {r['loss_se']:.5f} | "
                     f"{r['diff_vs_first']:+.5f} ± {r['diff_se']:.5f} | {lv} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT (repeat; the first is the "
                                                                    "reference of the paired differences)")
    ap.add_argument("--n", type=int, default=512, help="held-out images")
    ap.add_argument("--levels", type=int, default=8, help="sigma quadrature levels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md")
    args = ap.parse_args(argv)
    models = []
    for m in args.model:
        label, sep, path = m.partition("=")
        if not sep or not Path(path).exists():
            ap.error(f"--model {m!r}: expected LABEL=CHECKPOINT with an existing file")
        models.append((label, path))
    res = compare(models, args.n, args.levels, args.seed, args.threads)
    command = "python -m benchmarks.heldout_loss " + " ".join(
        f'--model "{m}"' for m in args.model) + f" --n {args.n} --levels {args.levels} --seed {args.seed} --out {args.out}"
    res["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(res, command))
    print(report(res, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

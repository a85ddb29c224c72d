"""Training curves: a run's periodic metric (the trainer's `metric/*` lines in log.jsonl) against the images
it has seen (kimg), for one or more runs on one figure.

    python -m benchmarks.training_curve --run "attention teacher=runs/teacher-attn:128" \
        --metric classifier_kid --out benchmarks/results/teacher_curve

Each --run is LABEL=RUN_DIR[:KIMG0]: KIMG0 is what the run's starting weights had already seen (a warm start),
so that curves of continued runs line up. kimg = KIMG0 + iteration x batch / 1000, the batch read from the
run's config.json. Writes STEM.json, STEM.md and STEM.png.

Points measured after training (a `benchmarks.quality` JSON per checkpoint, e.g. Inception KID at N=2000) join
with --eval LABEL=KIMG:QUALITY_JSON[:SAMPLER:STEPS] (repeatable; one curve per LABEL), the metric being a key of
the JSON's rows (`inception_kid`, `inception_fid`, `classifier_fd`, ...) and its `_std`, if any, the error bar:

    python -m benchmarks.training_curve --eval "attention teacher=346:a.json:heun:9" \
        --eval "attention teacher=404:b.json:heun:9" --metric inception_kid --out curve
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_curve(run_dir: str | Path, metric: str, kimg0: float = 0.0) -> dict:
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    batch = int(cfg["train"]["batch_size"])
    points = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed process
            continue
        key = metric if "/" in metric else f"metric/{metric}"  # a full key such as val/loss is taken as it is
        if key in rec:
            it = int(rec["it"])
            points.append({"it": it, "kimg": kimg0 + it * batch / 1000.0, "value": float(rec[key]),
                           "std": rec.get(f"{key}_std"), "n": rec.get("metric/n")})
    seen: dict[int, dict] = {}
    for p in points:  # a resumed run may log the same iteration twice: keep the last
        seen[p["it"]] = p
    return {"run_dir": str(run_dir), "batch": batch, "kimg0": kimg0, "metric": metric,
            "points": [seen[k] for k in sorted(seen)]}


def read_eval_point(spec: str, metric: str) -> tuple[str, dict]:
    """LABEL=KIMG:QUALITY_JSON[:SAMPLER:STEPS] -> (label, point) from a `benchmarks.quality` result."""
    label, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or len(parts) not in (2, 4):
        raise ValueError(f"--eval wants LABEL=KIMG:QUALITY_JSON[:SAMPLER:STEPS], got {spec!r}")
    kimg, path = float(parts[0]), parts[1]
    res = json.loads(Path(path).read_text())
    rows = res["rows"]
    if len(parts) == 4:
        rows = [r for r in rows if r.get("sampler") == parts[2] and int(r.get("steps", 0)) == int(parts[3])]
    rows = [r for r in rows if r.get(metric) is not None]
    if len(rows) != 1:
        raise ValueError(f"{path}: {len(rows)} rows with {metric!r}{' for ' + ':'.join(parts[2:]) if len(parts) == 4 else ''}"
                         f"; name one with :SAMPLER:STEPS")
    r = rows[0]
    n = res.get("n_inception") if metric.startswith("inception") else res.get("n")
    return label, {"it": None, "kimg": kimg, "value": float(r[metric]), "std": r.get(f"{metric}_std"), "n": n,
                   "source": path, "sampler": f"{r.get('sampler')}:{r.get('steps')}"}


def _fmt_std(std) -> str:
    return "" if std is None else f"{std:.2g}"


def parse_run(spec: str) -> tuple[str, str, float]:
    label, sep, rest = spec.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--run wants LABEL=RUN_DIR[:KIMG0], got {spec!r}")
    path, _, k0 = rest.partition(":")
    return label, path, float(k0) if k0 else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR[:KIMG0] (repeatable)")
    ap.add_argument("--eval", action="append", default=[],
                    help="LABEL=KIMG:QUALITY_JSON[:SAMPLER:STEPS] (repeatable): a point measured after training")
    ap.add_argument("--metric", default="classifier_kid",
                    help="name after metric/ in log.jsonl, or a full key with a slash (e.g. val/loss, the held-out "
                         "loss of the offline methods)")
    ap.add_argument("--title", default="Metric vs training images")
    ap.add_argument("--note", default="", help="how the trainer computed the metric (sampler, N, EMA)")
    ap.add_argument("--out", required=True, help="output stem")
    args = ap.parse_args(argv)
    if not args.run and not args.eval:
        ap.error("give at least one --run or --eval")
    curves = {}
    for spec in args.eval:
        try:
            label, point = read_eval_point(spec, args.metric)
        except (ValueError, OSError, KeyError) as e:
            print(str(e), file=sys.stderr)
            return 2
        c = curves.setdefault(label, {"run_dir": None, "batch": None, "kimg0": 0.0, "metric": args.metric,
                                      "points": []})
        c["points"] = sorted(c["points"] + [point], key=lambda p: p["kimg"])
    for spec in args.run:
        label, path, k0 = parse_run(spec)
        curves[label] = read_curve(path, args.metric, k0)
        if not curves[label]["points"]:
            print(f"{path}: no {args.metric if '/' in args.metric else 'metric/' + args.metric} lines in log.jsonl",
                  file=sys.stderr)
            return 2
    res = {"title": args.title, "metric": args.metric, "curves": curves,
           "command": "python -m benchmarks.training_curve " + " ".join(
               [f'--run "{s}"' if " " in s else f"--run {s}" for s in args.run]
               + [f'--eval "{s}"' if " " in s else f"--eval {s}" for s in args.eval])
           + f' --metric {args.metric} --title "{args.title}"' + (f' --note "{args.note}"' if args.note else "")
           + f" --out {args.out}"}
    source = "as the trainer logs it" if args.run else "from the evaluation results named below"
    lines = [f"# {args.title}", "", f"Metric: `{args.metric}` {source}. {args.note}".rstrip(), ""]
    for label, c in curves.items():
        if c["run_dir"] is None:  # evaluated checkpoints
            lines += [f"## {label}", "", "| kimg | value | std | N | sampler | result |", "|---|---|---|---|---|---|"]
            lines += [f"| {p['kimg']:.1f} | {p['value']:.5g} | {_fmt_std(p['std'])} | {p['n']} | {p['sampler']} "
                      f"| `{p['source']}` |" for p in c["points"]]
        else:
            lines += [f"## {label}", "", f"Run `{c['run_dir']}`, batch {c['batch']}, starting at {c['kimg0']:g} kimg.",
                      "", "| iteration | kimg | value |", "|---|---|---|"]
            lines += [f"| {p['it']} | {p['kimg']:.1f} | {p['value']:.3f} |" for p in c["points"]]
        lines.append("")
    lines.append(f"Command: `{res['command']}`")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        xs, ys = [p["kimg"] for p in c["points"]], [p["value"] for p in c["points"]]
        errs = [p.get("std") for p in c["points"]]
        if all(e is not None for e in errs):
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3, label=label)
        else:
            ax.plot(xs, ys, "o-", label=label)
    ax.set_xlabel("training images seen (kimg)")
    ax.set_ylabel(args.metric)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quality vs NFE: the rows of several `benchmarks.quality` results (the same model, or several teachers),
merged into one table and one figure per metric, each model's best point marked (its "best-NFE" value).

    python -m benchmarks.nfe_curve --result "teacher=runs/tq_det.json" --result "teacher=runs/tq_sde.json" \
        --metric inception_kid --out benchmarks/results/teacher_nfe

Each --result is LABEL=QUALITY_JSON (repeatable; rows of one LABEL from several files join one model). Within a
model, one curve per sampler: a stochastic sampler (heun-sde) is named with its churn settings, so that
different churns stay apart. Rows without the metric (e.g. no Inception at that point) are left out. Results of
one LABEL must agree on N and on the model file's hash, or the merge is refused.
Writes STEM.json, STEM.md and STEM.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def sampler_name(row: dict) -> str:
    c = row.get("churn")
    if not c:
        return row["sampler"]
    return (f"{row['sampler']} (S_churn {c['S_churn']:g}, S_tmin {c['S_tmin']:g}, S_tmax {c['S_tmax']:g}, "
            f"S_noise {c['S_noise']:g})")


def merge(results: list[tuple[str, str]], metric: str) -> dict:
    """[(label, quality_json)] -> {label: {"model", "sha256", "n", "points": [...], "best": point}}."""
    n_key = "n_inception" if metric.startswith("inception") else "n"
    models: dict[str, dict] = {}
    for label, path in results:
        res = json.loads(Path(path).read_text())
        m = models.setdefault(label, {"model": res["model"], "sha256": res.get("model_sha256"), "n": res.get(n_key),
                                      "baseline": res["baselines"].get(metric.split("_")[0]), "points": [],
                                      "sources": []})
        if res.get("model_sha256") != m["sha256"] or res.get(n_key) != m["n"]:
            raise ValueError(f"{path}: model sha256 {str(res.get('model_sha256'))[:12]} / N {res.get(n_key)} differ "
                             f"from the other results of {label!r} ({str(m['sha256'])[:12]} / N {m['n']})")
        m["sources"].append({"path": path, "command": res.get("run", {}).get("command")})
        for r in res["rows"]:
            if r.get(metric) is None:
                continue
            m["points"].append({"sampler": sampler_name(r), "steps": r["steps"], "nfe": r["nfe"],
                                "value": float(r[metric]), "std": r.get(f"{metric}_std"),
                                "sample_seconds": r.get("sample_seconds"), "source": path})
    for label, m in models.items():
        if not m["points"]:
            raise ValueError(f"{label!r}: no row carries {metric!r}")
        m["points"].sort(key=lambda p: (p["sampler"], p["nfe"]))
        m["best"] = min(m["points"], key=lambda p: p["value"])
    return models


def _unit(scale: float) -> str:
    """' x1e3' for values shown multiplied by 1000 (the convention of the results tables)."""
    return "" if scale == 1 else (" x1e3" if scale == 1000 else f" x{scale:g}")


def _fmt(v, std, scale) -> str:
    return f"{v * scale:.2f}" + ("" if std is None else f" ± {std * scale:.2f}")


def to_markdown(models: dict, metric: str, title: str, scale: float, note: str, command: str) -> str:
    unit = _unit(scale)
    lines = [f"# {title}", "", f"Metric: `{metric}`{unit}, from the `benchmarks.quality` results named below "
             f"(same seeds and class-balanced labels for every row). {note}".rstrip(), ""]
    for label, m in models.items():
        b = m["best"]
        base = m.get("baseline") or {}
        kid_base = base.get("kid") if metric.endswith("kid") else base.get("fid")
        lines += [f"## {label}", "", f"Model `{m['model']}` (sha256 {str(m['sha256'])[:12]}), N={m['n']}"
                  + (f"; real-vs-real at the same N: {kid_base * scale:.2f}" if kid_base is not None else "") + ".",
                  f"Best: **{b['sampler']}, {b['steps']} steps ({b['nfe']} NFE): {_fmt(b['value'], b['std'], scale)}**.",
                  "", "| sampler | steps | NFE | value | sampling s (N images) | result |", "|---|---|---|---|---|---|"]
        for p in m["points"]:
            v = _fmt(p["value"], p["std"], scale)
            v = f"**{v}**" if p is b else v
            secs = f"{p['sample_seconds']:.0f}" if p.get("sample_seconds") is not None else "-"
            lines.append(f"| {p['sampler']} | {p['steps']} | {p['nfe']} | {v} | {secs} | `{p['source']}` |")
        lines += ["", "Measured by:"] + [f"- `{s['command']}`" for s in m["sources"]] + [""]
    lines.append(f"Command: `{command}`")
    return "\n".join(lines) + "\n"


def plot(models: dict, metric: str, title: str, scale: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, m in models.items():
        for sampler in dict.fromkeys(p["sampler"] for p in m["points"]):
            pts = sorted((p for p in m["points"] if p["sampler"] == sampler), key=lambda p: p["nfe"])
            xs, ys = [p["nfe"] for p in pts], [p["value"] * scale for p in pts]
            errs = [p["std"] * scale if p["std"] is not None else 0.0 for p in pts]
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3, label=f"{label}: {sampler}")
        b = m["best"]
        ax.plot([b["nfe"]], [b["value"] * scale], "k*", markersize=12)
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel(f"{metric}{_unit(scale)}")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", action="append", required=True, help="LABEL=QUALITY_JSON (repeatable)")
    ap.add_argument("--metric", default="inception_kid", help="a key of the quality rows (inception_kid, ...)")
    ap.add_argument("--scale", type=float, default=None,
                    help="multiply values for display (default 1000 for inception_kid, else 1)")
    ap.add_argument("--title", default="Quality vs NFE")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True, help="output stem")
    args = ap.parse_args(argv)
    specs = []
    for spec in args.result:
        label, sep, path = spec.partition("=")
        if not sep or not path:
            ap.error(f"--result wants LABEL=QUALITY_JSON, got {spec!r}")
        specs.append((label, path))
    try:
        models = merge(specs, args.metric)
    except (ValueError, OSError, KeyError) as e:
        print(str(e), file=sys.stderr)
        return 2
    scale = args.scale if args.scale is not None else (1000.0 if args.metric == "inception_kid" else 1.0)
    command = ("python -m benchmarks.nfe_curve " + " ".join(f'--result "{s}"' for s in args.result)
               + f" --metric {args.metric} --title \"{args.title}\"" + (f' --note "{args.note}"' if args.note else "")
               + f" --out {args.out}")
    md = to_markdown(models, args.metric, args.title, scale, args.note, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"title": args.title, "metric": args.metric, "models": models,
                                                    "command": command}, indent=1))
    out.with_suffix(".md").write_text(md)
    plot(models, args.metric, args.title, scale, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

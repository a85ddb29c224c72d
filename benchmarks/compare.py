"""One table for all students and the teacher, from the JSON files `benchmarks.quality` wrote.

    python -m benchmarks.compare --teacher benchmarks/results/teacher_quality.json \
        --student denoising-student=benchmarks/results/student_ds.json:runs/ds \
        --student sid=benchmarks/results/student_sid.json:runs/sid --out benchmarks/results/students
Each student entry is NAME=QUALITY_JSON[:RUN_DIR]; the run folder gives the budget (iterations, batch, wall
time) from its log and config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _budget(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "log.jsonl").exists():
        return {}
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "sec_per_it" in r]
    cfg = json.loads((run_dir / "config.json").read_text())
    last = train_rows[-1] if train_rows else {}
    secs = sum(r["sec_per_it"] * (r["it"] - p["it"]) for p, r in zip([{"it": 0}] + train_rows[:-1], train_rows))
    return {"iterations": last.get("it"), "batch": cfg["train"]["batch_size"], "kimg": last.get("kimg"),
            "train_seconds": secs, "machine": cfg.get("machine", {}).get("cpu_model"),
            "threads": cfg["train"].get("num_threads")}


def pareto(teacher: dict, rows: list[dict], latency: dict, path: Path) -> list[dict]:
    """Inception KID vs onnxruntime batch-1 p50 latency: teacher points (by NFE, latency scaled from the measured
    per-NFE cost of the same network) and the students (measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = {(r["model"], r["batch"]): r for r in latency["rows"] if r["backend"] == "onnxruntime"}
    teacher_rows = [r for r in lat.values() if r["model"].startswith("teacher") and r["batch"] == 1]
    if not teacher_rows or ("student", 1) not in lat:
        return []
    per_nfe = sum(r["p50_ms"] for r in teacher_rows) / sum(r["nfe"] for r in teacher_rows)
    pts = []
    for r in teacher["rows"]:
        if "inception_kid" in r:
            measured = next((x for x in teacher_rows if x["nfe"] == r["nfe"]), None)
            ms = measured["p50_ms"] if measured else per_nfe * r["nfe"]
            pts.append({"name": f"teacher {r['sampler']} {r['nfe']} NFE", "ms": ms, "kid": r["inception_kid"],
                        "latency": "measured" if measured else "per-NFE estimate"})
    for r in rows:
        if r.get("budget") is not None and r.get("inception_kid") is not None:
            pts.append({"name": r["name"], "ms": lat[("student", 1)]["p50_ms"], "kid": r["inception_kid"],
                        "latency": "measured (same network, 1 NFE)"})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = [p for p in pts if p["name"].startswith("teacher")]
    s = [p for p in pts if not p["name"].startswith("teacher")]
    ax.plot([p["ms"] for p in t], [p["kid"] * 1e3 for p in t], "o-", color="tab:blue", label="teacher (N NFE)")
    for p in t:
        ax.annotate(p["name"].split(" ", 1)[1], (p["ms"], p["kid"] * 1e3), fontsize=7)
    for p in s:
        ax.plot([p["ms"]], [p["kid"] * 1e3], "*", markersize=12, label=f"{p['name']} (1 NFE)")
    ax.set_xscale("log")
    ax.set_xlabel("onnxruntime CPU latency per image, batch 1, p50 (ms)")
    ax.set_ylabel("Inception KID x1e3 (lower is better)")
    ax.set_title("Quality vs latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return pts


def main(argv=None) -> int:
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", action="append", default=[], help="NAME=QUALITY_JSON[:RUN_DIR]")
    ap.add_argument("--latency", default=None, help="latency JSON (benchmarks.latency) for the Pareto chart")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t = json.loads(Path(args.teacher).read_text())
    inc_rows = [r for r in t["rows"] if "inception_kid" in r]
    t1 = next((r for r in t["rows"] if r["nfe"] == 1 and "inception_kid" in r), None)
    best = min(inc_rows, key=lambda r: r["inception_kid"]) if inc_rows else None
    rows = []
    for label, r in (("teacher, 1 NFE (Euler)", t1), (f"teacher, best ({best['sampler']} {best['nfe']} NFE)"
                                                       if best else "teacher best", best)):
        if r:
            rows.append({"name": label, "nfe": r["nfe"], **{k: r.get(k) for k in (
                "inception_fid", "inception_kid", "inception_kid_std", "classifier_kid", "class_agreement")}})
    for spec in args.student:
        name, _, rest = spec.partition("=")
        qpath, _, run_dir = rest.partition(":")
        q = json.loads(Path(qpath).read_text())
        r = q["rows"][0]
        rows.append({"name": name, "nfe": 1, **{k: r.get(k) for k in ("inception_fid", "inception_kid",
                                                                       "inception_kid_std", "classifier_kid",
                                                                       "class_agreement")},
                     "budget": _budget(Path(run_dir) if run_dir else None), "model": q["model"],
                     "command": q.get("run", {}).get("command")})
    res = {"teacher": args.teacher, "baselines": t["baselines"], "n_inception": t["n_inception"], "n": t["n"],
           "rows": rows}
    b = t["baselines"]
    lines = ["# One-step students vs their teacher (Fashion-MNIST 32x32, class-conditional)", "",
             f"Inception FID/KID at N={t['n_inception']} generated vs N real test images; real-vs-real baseline at "
             f"the same N: FID {b['inception']['fid']:.2f}, KID {b['inception']['kid']*1e3:.2f}e-3. Classifier-space "
             f"KID at N={t['n']} (real-vs-real {b['classifier']['kid']:.2f}; its own scale, not comparable to "
             f"Inception KID).", "",
             "| model | NFE | Inception FID | Inception KID x1e3 | classifier KID | class agreement | budget |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bud = r.get("budget") or {}
        btxt = (f"{bud.get('iterations')} it x {bud.get('batch')} ({bud.get('kimg')} kimg), "
                f"{(bud.get('train_seconds') or 0)/60:.0f} min CPU") if bud else ""
        fid = f"{r['inception_fid']:.2f}" if r.get("inception_fid") is not None else "-"
        kid = (f"{r['inception_kid']*1e3:.2f} ± {r['inception_kid_std']*1e3:.2f}"
               if r.get("inception_kid") is not None else "-")
        agree = f"{r['class_agreement']:.3f}" if r.get("class_agreement") is not None else "-"
        lines.append(f"| {r['name']} | {r['nfe']} | {fid} | {kid} | {r['classifier_kid']:.2f} | {agree} | {btxt} |")
    lines.append("")
    if args.latency:
        res["pareto"] = pareto(t, rows, json.loads(Path(args.latency).read_text()), Path(f"{args.out}-pareto.png"))
        lines += [f"![quality vs latency]({Path(args.out).name}-pareto.png)", ""]
    atomic_write_json(f"{args.out}.json", res)
    atomic_write_bytes(f"{args.out}.md", "\n".join(lines).encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

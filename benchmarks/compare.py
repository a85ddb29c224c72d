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


def main(argv=None) -> int:
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", action="append", default=[], help="NAME=QUALITY_JSON[:RUN_DIR]")
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
    atomic_write_json(f"{args.out}.json", res)
    atomic_write_bytes(f"{args.out}.md", "\n".join(lines).encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

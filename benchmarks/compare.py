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
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _train_seconds(train_rows: list[dict]) -> float:
    """Training time from a run's log rows. Rows with 'elapsed_s' carry sec_per_it over their own window, so the
    time is the sum of sec_per_it x the window's iterations. Older rows (no 'elapsed_s') carried the average since
    the process started: the last of them times its iteration is that process's time, exact for a run that was
    never resumed (a resumed one is counted as if its last process had run from iteration 0)."""
    legacy = [r for r in train_rows if "elapsed_s" not in r]
    secs, it_prev = 0.0, 0
    if legacy:
        secs, it_prev = legacy[-1]["sec_per_it"] * legacy[-1]["it"], legacy[-1]["it"]
    for r in train_rows:
        if "elapsed_s" in r and r["it"] > it_prev:
            secs += r["sec_per_it"] * (r["it"] - it_prev)
            it_prev = r["it"]
    return secs


def _budget(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "log.jsonl").exists():
        return {}
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "sec_per_it" in r]
    cfg = json.loads((run_dir / "config.json").read_text())
    last = train_rows[-1] if train_rows else {}
    secs = _train_seconds(train_rows)
    out = {"iterations": last.get("it"), "batch": cfg["train"]["batch_size"], "kimg": last.get("kimg"),
           "train_seconds": secs, "machine": cfg.get("machine", {}).get("cpu_model"),
           "device": (cfg.get("device") or {}).get("name") or "CPU",
           "threads": cfg["train"].get("num_threads")}
    if (cfg.get("init") or {}).get("source"):  # a run continued from another student's weights
        out["init_from"] = cfg["init"]["source"]
    return out


def _budget_text(bud: dict) -> str:
    """'1200 it x 128 (153.6 kimg), 8 min NVIDIA H200', preceded by the budget it continued from."""
    if not bud:
        return ""
    txt = (f"{bud.get('iterations')} it x {bud.get('batch')} ({bud.get('kimg')} kimg), "
           f"{(bud.get('train_seconds') or 0)/60:.0f} min {bud.get('device', 'CPU')}")
    return f"{_budget_text(bud['before'])}, then {txt}" if bud.get("before") else txt


def measure_latency(students: dict[str, str], teacher: str, workdir: Path, method=None) -> dict:
    """onnxruntime CPU latency at batch 1, all models in this one process, interleaved in rounds with the
    benchmarks' one method (benchmarks/stats.py): each student graph (z, labels) -> image, and one Euler step of
    the teacher's denoiser graph (the per-NFE cost). Each model's latency is the median over rounds of its
    per-round median; each model's ratio to the teacher's 1-NFE step is the median of per-round ratios, both
    with a seeded bootstrap 95% interval. Also counts parameters."""
    import torch

    from benchmarks import stats
    from exporters.onnx_export import export_onnx
    from onestep.checkpoint import load_model
    from onestep.noise import seeded_noise
    from serving.engine import ImageEngine

    method = method or stats.Method()
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"threads": torch.get_num_threads(), "rounds": method.rounds, "method": method.as_dict(),
           "method_text": method.describe(), "models": {}}
    runners = {}
    for i, (name, path) in enumerate([("teacher", teacher), *students.items()]):
        model, _ = load_model(path)
        onnx_path = workdir / f"model{i}.onnx"
        side = export_onnx(path, onnx_path)
        eng = ImageEngine(onnx_path, sampler="euler", steps=1, meta=side)  # teacher: 1 Euler step = 1 NFE
        z = seeded_noise([0], eng.shape)
        labels = np.zeros(1, np.int64) if eng.num_classes else None
        runners[name] = (lambda e=eng, z=z, lab=labels: e.model_output(z, lab))
        out["models"][name] = {"params": sum(p.numel() for p in model.parameters()),
                               "onnx_parity_max_abs_err": side["parity"]["max_abs_err"]}
    results = stats.run_interleaved(runners, method)
    rounds = {name: np.asarray(results[name].round_medians()) * 1e3 for name in runners}
    for name in runners:
        e = stats.estimate(rounds[name])
        out["models"][name].update(stats.percentiles_ms(results[name].all_calls()))
        out["models"][name].update({"p50_ms": e["median"], "p50_ci_ms": [e["ci_low"], e["ci_high"]],
                                    "round_medians_ms": [float(x) for x in rounds[name]],
                                    "vs_teacher_nfe": stats.ratio(rounds[name], rounds["teacher"])})
        print(json.dumps({name: out["models"][name]["p50_ms"]}), flush=True)
    return out


def _points_from_latency_json(teacher: dict, rows: list[dict], latency: dict) -> list[dict]:
    """Older path: a benchmarks.latency JSON (one student network timed for every student)."""
    lat = {(r["model"], r["batch"]): r for r in latency["rows"] if r["backend"] == "onnxruntime"}
    teacher_rows = [r for r in lat.values() if r["model"].startswith("teacher") and r["batch"] == 1]
    if not teacher_rows or ("student", 1) not in lat:
        return []
    per_nfe = sum(r["p50_ms"] for r in teacher_rows) / sum(r["nfe"] for r in teacher_rows)
    pts = []
    for r in teacher["rows"]:
        if "inception_kid" in r:
            measured = next((x for x in teacher_rows if x["nfe"] == r["nfe"]), None)
            pts.append({"name": f"teacher {r['sampler']} {r['nfe']} NFE", "kid": r["inception_kid"],
                        "ms": measured["p50_ms"] if measured else per_nfe * r["nfe"],
                        "latency": "measured" if measured else "per-NFE estimate"})
    for r in rows:
        if r.get("budget") is not None and r.get("inception_kid") is not None:
            pts.append({"name": r["name"], "ms": lat[("student", 1)]["p50_ms"], "kid": r["inception_kid"],
                        "latency": "measured (same network, 1 NFE)"})
    return pts


def _points_from_measured(teacher: dict, rows: list[dict], measured: dict) -> list[dict]:
    per_nfe = measured["models"]["teacher"]["p50_ms"]
    pts = [{"name": f"teacher {r['sampler']} {r['nfe']} NFE", "kid": r["inception_kid"], "ms": per_nfe * r["nfe"],
            "latency": "NFE x measured 1-NFE latency"} for r in teacher["rows"] if "inception_kid" in r]
    pts += [{"name": r["name"], "kid": r["inception_kid"], "ms": r["latency_ms"], "latency": "measured"}
            for r in rows if r.get("latency_ms") is not None and r.get("budget") is not None
            and r.get("inception_kid") is not None]
    return pts


def pareto(pts: list[dict], path: Path, x_label: str) -> list[dict]:
    """Inception KID vs batch-1 latency: the teacher by NFE (a line) and each student (a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    t = [p for p in pts if p["name"].startswith("teacher")]
    s = [p for p in pts if not p["name"].startswith("teacher")]
    ax.plot([p["ms"] for p in t], [p["kid"] * 1e3 for p in t], "o-", color="tab:blue", label="teacher (N NFE)")
    for p in t:
        ax.annotate(p["name"].split(" ", 1)[1], (p["ms"], p["kid"] * 1e3), fontsize=7)
    markers = "*^sDvP<>hX"
    for i, p in enumerate(s):
        ax.plot([p["ms"]], [p["kid"] * 1e3], markers[i % len(markers)], markersize=10, label=p["name"])
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("Inception KID x1e3 (lower is better)")
    ax.set_title("Quality vs latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return pts


def load_teacher_results(paths: list[str]) -> dict:
    """One teacher's `benchmarks.quality` results joined: the first file's header, every file's rows (each row
    remembers its file as `source`). The files must name the same model hash and Inception N, or they are refused;
    rows measured at another classifier N than the first file's lose their classifier metrics (not comparable)."""
    t = None
    for path in paths:
        res = json.loads(Path(path).read_text())
        rows = [{**r, "source": path} for r in res["rows"]]
        if t is None:
            t = {**res, "rows": rows, "sources": [path]}
            continue
        if res.get("n") != t.get("n"):
            rows = [{k: v for k, v in r.items() if not k.startswith("class")} for r in rows]
        for key in ("model_sha256", "n_inception"):
            if res.get(key) != t.get(key):
                raise ValueError(f"{path}: {key} {res.get(key)!r} differs from {paths[0]}'s {t.get(key)!r}: "
                                 f"teacher results must be of one model at one N")
        t["rows"] += rows
        t["sources"].append(path)
    return t


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def main(argv=None) -> int:
    from benchmarks.report import write_report
    from onestep.provenance import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, action="append",
                    help="teacher quality JSON (benchmarks.quality); repeatable: the rows of several results of the "
                         "same teacher file at the same N join (e.g. more samplers measured later)")
    ap.add_argument("--student", action="append", default=[], help="NAME=QUALITY_JSON[:RUN_DIR]")
    ap.add_argument("--latency", default=None, help="latency JSON (benchmarks.latency) for the Pareto chart")
    ap.add_argument("--measure-latency", action="store_true",
                    help="export every model to ONNX and time it at batch 1 in this process (params + ms columns)")
    ap.add_argument("--latency-min-calls", "--latency-repeats", dest="latency_min_calls", type=int, default=200,
                    help="timed calls per model, at least")
    ap.add_argument("--latency-window-s", type=float, default=10.0, help="timed seconds per model, at least")
    ap.add_argument("--latency-rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--quick", action="store_true",
                    help="short latency windows, same method (figures indicative only)")
    ap.add_argument("--workdir", default=None, help="where the ONNX files for --measure-latency go")
    ap.add_argument("--budgets", default=None,
                    help="an earlier compare JSON: a student given without a run folder takes the budget recorded "
                         "there under its name, and a run folder continued from another student's weights "
                         "(config init) is shown after that recorded budget")
    ap.add_argument("--note", default=None, help="a paragraph printed under the header (e.g. how budgets were read)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    earlier_res = json.loads(Path(args.budgets).read_text()) if args.budgets else {}
    earlier = {r["name"]: r.get("budget") or {} for r in earlier_res.get("rows", [])}
    try:
        t = load_teacher_results(args.teacher)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    inc_rows = [r for r in t["rows"] if "inception_kid" in r]
    t1 = next((r for r in t["rows"] if r["nfe"] == 1 and "inception_kid" in r), None)
    best = min(inc_rows, key=lambda r: r["inception_kid"]) if inc_rows else None
    metric_keys = ("inception_fid", "inception_kid", "inception_kid_std", "classifier_kid", "class_agreement")
    rows = []
    for label, r in (("teacher, 1 NFE (Euler)", t1), (f"teacher, best ({best['sampler']} {best['nfe']} NFE)"
                                                       if best else "teacher best", best)):
        if r:
            rows.append({"name": label, "nfe": r["nfe"], **{k: r.get(k) for k in metric_keys},
                         "grid": f"{Path(r['source']).stem}-grids/grid-{r['sampler']}-{r['steps']}.png"})
    students = {}
    cls_n = defaultdict(list)  # (classifier N, its real-vs-real KID) -> the students measured at it
    for spec in args.student:
        name, _, rest = spec.partition("=")
        qpath, _, run_dir = rest.partition(":")
        q = json.loads(Path(qpath).read_text())
        r = q["rows"][0]
        bud = _budget(Path(run_dir)) if run_dir else dict(earlier.get(name) or {})
        if run_dir and bud.get("init_from") and earlier.get(name):  # a carried budget is already chained
            bud["before"] = earlier[name]
        cls_kid = ((q.get("baselines") or {}).get("classifier") or {}).get("kid")
        cls_n[(q.get("n"), None if cls_kid is None else round(cls_kid, 2))].append(name)
        rows.append({"name": name, "nfe": 1, **{k: r.get(k) for k in metric_keys}, "budget": bud, "model": q["model"],
                     "command": q.get("run", {}).get("command"),
                     "grid": f"{Path(qpath).stem}-grids/grid-onestep-1.png"})
        students[name] = q["model"]
    res = {"teacher": args.teacher, "baselines": t["baselines"], "n_inception": t["n_inception"], "n": t["n"],
           "command": "python -m benchmarks.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "note": args.note, "rows": rows}
    measured = None
    if args.measure_latency:
        import tempfile

        from benchmarks.stats import Method

        method = (Method.quick_method() if args.quick else
                  Method(min_calls=args.latency_min_calls, window_s=args.latency_window_s, rounds=args.latency_rounds))
        measured = measure_latency(students, t["model"], Path(args.workdir or tempfile.mkdtemp(prefix="onestep-cmp-")),
                                   method)
        res["latency"] = measured
    elif earlier_res.get("latency"):  # the same networks, timed when the earlier table was made
        measured = {**earlier_res["latency"], "carried_from": args.budgets}
        res["latency"] = measured
    if measured:
        per_nfe = measured["models"]["teacher"]["p50_ms"]
        for r in rows:
            m = measured["models"].get(r["name"])
            r["latency_ms"] = m["p50_ms"] if m else per_nfe * r["nfe"]
            r["params"] = m["params"] if m else measured["models"]["teacher"]["params"]
    b = t["baselines"]
    lines = ["# One-step students vs their teacher (Fashion-MNIST 32x32, class-conditional)", "",
             f"Inception FID/KID at N={t['n_inception']} generated vs N real test images; real-vs-real baseline at "
             f"the same N: FID {b['inception']['fid']:.2f}, KID {b['inception']['kid']*1e3:.2f}e-3. Classifier-space "
             f"KID (its own scale, not comparable to Inception KID): teacher rows at N={t['n']} (real-vs-real "
             f"{b['classifier']['kid']:.2f})"
             + "".join(f"; {', '.join(names)} at N={n} (real-vs-real {_fmt(kid, '.2f')})" for (n, kid), names in cls_n.items())
             + ". A '-' is a metric not measured at that N.", ""]
    if args.note:
        lines += [args.note, ""]
    if measured:
        from benchmarks.stats import fmt_ci

        if measured.get("carried_from"):
            lines += [f"Latency carried over from `{measured['carried_from']}` (students of the same names and "
                      "networks, timed when that table was made):", ""]
        lines += [f"Latency: onnxruntime CPU, batch 1, all models in one process ({measured['threads']} threads); "
                  f"{measured['method_text']}. Teacher rows are NFE x its measured 1-NFE latency. Students of the "
                  f"same network should time alike: their spread is the noise of the machine.", "",
                  "| model | ms/img [95% CI] | vs one teacher step [95% CI] |", "|---|---|---|"]
        for name, mm in measured["models"].items():
            lines.append(f"| {name} | {mm['p50_ms']:.2f} [{mm['p50_ci_ms'][0]:.2f}, {mm['p50_ci_ms'][1]:.2f}] | "
                         f"{fmt_ci(mm['vs_teacher_nfe'], '.2f', 'x')} |")
        from benchmarks.stats import spread_notes

        notes = spread_notes({f"{name} vs one teacher step": mm["vs_teacher_nfe"]
                              for name, mm in measured["models"].items()})
        if notes:
            lines += ["", "Large spread between rounds (the machine was not quiet): " + "; ".join(notes) + "."]
        lines.append("")
    head = ("| model | NFE | params | ms/img | Inception FID | Inception KID x1e3 | KID / teacher best | classifier KID "
            "| class agreement | budget | samples |")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        btxt = _budget_text(r.get("budget") or {})
        kid = (f"{r['inception_kid']*1e3:.2f} ± {r['inception_kid_std']*1e3:.2f}"
               if r.get("inception_kid") is not None else "-")
        params = f"{r['params']/1e6:.2f}M" if r.get("params") else "-"
        r["kid_vs_teacher_best"] = (r["inception_kid"] / best["inception_kid"]
                                    if best and r.get("inception_kid") is not None else None)
        lines.append(f"| {r['name']} | {r['nfe']} | {params} | {_fmt(r.get('latency_ms'), '.1f')} | "
                     f"{_fmt(r.get('inception_fid'), '.2f')} | {kid} | {_fmt(r['kid_vs_teacher_best'], '.2f')} | "
                     f"{_fmt(r.get('classifier_kid'), '.2f')} | "
                     f"{_fmt(r.get('class_agreement'), '.3f')} | {btxt} | "
                     + (f"[grid]({r['grid']})" if r.get("grid") else "") + " |")
    lines.append("")
    if measured or args.latency:
        pts = (_points_from_measured(t, rows, measured) if measured else
               _points_from_latency_json(t, rows, json.loads(Path(args.latency).read_text())))
        res["pareto"] = pareto(pts, Path(f"{args.out}-pareto.png"),
                               "onnxruntime CPU latency per image, batch 1, p50 (ms)")
        lines += [f"![quality vs latency]({Path(args.out).name}-pareto.png)", ""]
    write_report(args.out, res, lines[:-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

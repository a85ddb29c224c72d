"""Latency and throughput: the one-step student against its multi-step teacher, across backends.

Backends: PyTorch eager, torch.compile (where it works), onnxruntime (in-process, CPU or CUDA provider),
Triton over gRPC and HTTP (the real server; python backend running onnxruntime) and the HTTP image API.
For every (backend, model, batch): p50/p95/p99 latency and images/s after warm-up, plus a per-stage breakdown
(seed -> noise, model, uint8 + PNG encoding, transport/queue = served - in-process). FLOPs per image are
counted with torch's FlopCounterMode on the exported network (teacher: NFE x denoiser FLOPs); the peak is a
large fp32 matmul timed in the same run, so MFU = achieved FLOP/s / measured peak. Speed-ups are ratios
measured in this one run (student vs teacher, same backend, same batch).

    python -m benchmarks.latency --student artifacts/fmnist-student.safetensors \
        --teacher artifacts/fmnist-teacher.safetensors --out benchmarks/results/latency_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def percentiles(times_s: list[float]) -> dict:
    a = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "runs": len(a)}


def time_fn(fn, warmup: int, repeats: int, min_seconds: float = 0.0, sync=None) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start) < min_seconds:
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
        if len(times) >= 10 * repeats:
            break
    return times


def measure_peak_flops(device: str = "cpu", n: int = 1024, seconds: float = 2.0) -> dict:
    """FLOP/s of a large fp32 matmul on this device in this process: the practical ceiling for the model."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = time_fn(lambda: a @ b, 3, 5, seconds, sync)
    best = min(times)
    return {"matmul_n": n, "dtype": "float32", "best_s": best, "flops_per_s": 2 * n**3 / best,
            "threads": torch.get_num_threads()}


def count_flops(module, *args) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*args)
    return int(fc.get_total_flops())


def run(args) -> dict:
    import torch

    from exporters.onnx_export import export_onnx
    from exporters.triton_repo import build_repository
    from onestep.checkpoint import image_shape, load_model, load_teacher, save_model
    from onestep.images import encode_image
    from onestep.noise import seeded_noise
    from onestep.provenance import git_revision, machine_info, package_versions
    from onestep.samplers import make_sigmas, nfe, sample_euler, sample_heun
    from serving.engine import ImageEngine, to_uint8

    torch.set_num_threads(args.threads) if args.threads else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="onestep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    student, smeta = load_model(args.student)
    teacher, tmeta = load_teacher(args.teacher)  # our checkpoint or a diffusers model folder
    teacher_ckpt = Path(args.teacher)
    if teacher_ckpt.is_dir():  # a diffusers folder: export goes through a checkpoint of the same weights
        teacher_ckpt = work / "teacher.safetensors"
        if not teacher_ckpt.exists():
            save_model(teacher_ckpt, teacher, tmeta["model"], extra={"source": tmeta.get("source")})
    points = [(p.split(":")[0], int(p.split(":")[1])) for p in args.teacher_points.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    shape = tuple(image_shape(smeta["model"]))  # any model kind, any channel count and resolution
    if tuple(image_shape(tmeta["model"])) != shape:
        raise ValueError(f"student images {shape} and teacher images {tuple(image_shape(tmeta['model']))} differ: "
                         f"benchmark a student against its own teacher")
    n_cls = int(getattr(student, "num_classes", 0))
    backends = args.backends.split(",")
    res: dict = {"machine": machine_info(), "versions": package_versions(), "git_revision": git_revision(),
                 "command": ("onestep " if sys.argv[0].endswith("onestep") else "python -m benchmarks.latency ")
                 + " ".join(sys.argv[1:]), "torch_threads":
                 torch.get_num_threads(), "student": str(args.student), "teacher": str(args.teacher),
                 "student_method": smeta.get("method"), "rows": []}
    res["peak"] = measure_peak_flops("cpu")
    z1 = torch.from_numpy(seeded_noise([0], shape))
    l1 = torch.tensor([0]) if n_cls else None
    f_student = count_flops(student, z1, l1)
    s_probe = min(80.0, float(teacher.sigma_max))
    f_denoiser = count_flops(teacher, z1 * s_probe, torch.tensor([s_probe]), l1)
    res["flops_per_image"] = {"student": f_student, "teacher_denoiser_call": f_denoiser}
    print(json.dumps({"peak_gflops": res["peak"]["flops_per_s"] / 1e9, "student_mflops": f_student / 1e6}), flush=True)

    def add(backend, model, k, batch, times, stages=None):
        row = {"backend": backend, "model": model, "nfe": k, "batch": batch, **percentiles(times)}
        row["images_per_s"] = batch / np.median(times)
        flops = (f_student if k == 1 and model == "student" else f_denoiser * k) * batch
        row["achieved_gflops"] = flops / np.median(times) / 1e9
        row["mfu"] = flops / np.median(times) / res["peak"]["flops_per_s"]
        if stages:
            row["stages_ms"] = stages
        res["rows"].append(row)
        print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()
                          if k2 not in ("stages_ms",)}), flush=True)

    models = [("student", 1, None, None)] + [(f"teacher_{s}{n}", nfe(s, n), s, n) for s, n in points]
    # --- PyTorch eager / compile ---------------------------------------------------------------------------
    for backend in [b for b in backends if b in ("eager", "compile")]:
        s_mod, t_mod = student, teacher
        if backend == "compile":
            try:
                s_mod, t_mod = torch.compile(student), torch.compile(teacher)
                s_mod(z1, l1)
            except Exception as e:  # compile needs a C++ toolchain; say why it was skipped
                res.setdefault("skipped", {})["compile"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
        for b in batches:
            z = torch.from_numpy(seeded_noise(range(b), shape))
            lab = torch.arange(b) % n_cls if n_cls else None
            for name, k, smp, steps in models:
                if name == "student":
                    fn = lambda: s_mod(z, lab)  # noqa: E731
                else:
                    sig = make_sigmas("karras", steps, teacher.sigma_min, teacher.sigma_max)
                    sampler = sample_heun if smp == "heun" else sample_euler
                    fn = lambda: sampler(t_mod, z, sig, lab)  # noqa: E731
                with torch.no_grad():
                    reps = max(3, args.repeats // max(1, k // 4))
                    add(backend, name, k, b, time_fn(fn, args.warmup, reps, args.min_seconds))
    # --- onnxruntime in-process, with the stage breakdown ---------------------------------------------------
    s_onnx, t_onnx = work / "student.onnx", work / "teacher.onnx"
    if not s_onnx.exists():
        export_onnx(args.student, s_onnx)
    if not t_onnx.exists():
        export_onnx(teacher_ckpt, t_onnx)
    providers = args.providers.split(",")
    engines = {"student": ImageEngine(s_onnx, providers, intra_op_threads=args.threads)}
    for name, k, smp, steps in models[1:]:
        engines[name] = ImageEngine(t_onnx, providers, smp, steps, intra_op_threads=args.threads)
    inproc: dict = {}
    if "onnxruntime" in backends:
        for b in batches:
            seeds = list(range(b))
            lab = np.arange(b) % n_cls if n_cls else None
            for name, k, _, _ in models:
                eng = engines[name]
                z = seeded_noise(seeds, shape)
                reps = max(3, args.repeats // max(1, k // 4))
                t_noise = time_fn(lambda: seeded_noise(seeds, shape), 1, reps)
                t_model = time_fn(lambda: eng.model_output(z, lab), args.warmup, reps, args.min_seconds)
                x = eng.model_output(z, lab)
                t_post = time_fn(lambda: [encode_image(im.transpose(1, 2, 0)) for im in to_uint8(x)], 1, reps)
                t_total = time_fn(lambda: eng.generate(seeds, lab), 1, reps)
                stages = {"noise": float(np.median(t_noise) * 1e3), "model": float(np.median(t_model) * 1e3),
                          "uint8+png": float(np.median(t_post) * 1e3)}
                inproc[(name, b)] = float(np.median(t_total))
                add("onnxruntime", name, k, b, t_total, stages)
    # --- served: Triton gRPC / HTTP and the HTTP API ------------------------------------------------------
    served = [b for b in backends if b in ("triton-grpc", "triton-http", "api")]
    if served:
        from serving.client import APIClient, TritonImageClient
        from serving.triton_server import TritonServer

        repo = work / "repo"
        build_repository(repo, s_onnx, "student", t_onnx, tuple((s, n) for s, n in points),
                         max_batch=max(batches), max_queue_delay_us=args.queue_delay_us,
                         onnx_providers=args.providers, intra_op_threads=args.threads, with_onnx_platform=False)
        with TritonServer(repo, ready_timeout=180) as ts:
            api_srv = None
            if "api" in served:
                api_srv = _start_api(ts, repo)
            clients = {"triton-grpc": TritonImageClient(ts.grpc_url, "grpc"),
                       "triton-http": TritonImageClient(ts.http_url, "http")}
            for backend in served:
                for b in batches:
                    seeds = list(range(b))
                    lab = [s % n_cls for s in seeds] if n_cls else None
                    for name, k, _, _ in models:
                        if backend == "api":
                            if b > 64:
                                continue
                            c = APIClient(api_srv.url)
                            fn = lambda: c.generate(name, seeds, lab)  # noqa: E731
                        else:
                            fn = lambda: clients[backend].generate(name, seeds, lab)  # noqa: E731
                        reps = max(3, args.repeats // max(1, k // 4))
                        times = time_fn(fn, args.warmup, reps, args.min_seconds)
                        stages = None
                        if (name, b) in inproc:
                            stages = {"in_process_total": inproc[(name, b)] * 1e3,
                                      "transport+queue+ipc": float(np.median(times) - inproc[(name, b)]) * 1e3}
                        add(backend, name, k, b, times, stages)
            if "triton-grpc" in served and args.concurrency:
                res["concurrency"] = _concurrency_sweep(ts.grpc_url, [int(c) for c in args.concurrency.split(",")],
                                                        n_cls, args.min_seconds)
            if api_srv:
                api_srv.stop()
    res["summary"] = summarise(res)
    return res


def _start_api(ts, repo):
    from serving.api import APISettings
    from serving.background import APIThread

    return APIThread(APISettings(triton_url=ts.grpc_url, repository=str(repo), max_images=256,
                                 max_inflight=256)).start()


def _concurrency_sweep(url: str, levels: list[int], n_cls: int, seconds: float) -> list[dict]:
    """Closed-loop clients, batch 1 each, against the student over gRPC: throughput and latency per level."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.client import TritonImageClient

    out = []
    for c in levels:
        def worker(i):
            cl = TritonImageClient(url, "grpc")
            lat, t_end, s = [], time.perf_counter() + max(seconds, 2.0), i * 100_000
            while time.perf_counter() < t_end:
                t = time.perf_counter()
                cl.generate("student", [s], [s % n_cls] if n_cls else None)
                lat.append(time.perf_counter() - t)
                s += 1
            cl.close()
            return lat

        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as ex:
            lats = sum(ex.map(worker, range(c)), [])
        wall = time.perf_counter() - t0
        row = {"concurrency": c, "images_per_s": len(lats) / wall, **percentiles(lats)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def summarise(res: dict) -> dict:
    """Speed-ups (teacher / student latency) per backend and batch, measured in this run."""
    by = {(r["backend"], r["model"], r["batch"]): r for r in res["rows"]}
    speedups = []
    for (backend, model, batch), r in by.items():
        if model == "student":
            continue
        s = by.get((backend, "student", batch))
        if s:
            speedups.append({"backend": backend, "batch": batch, "teacher": model, "nfe": r["nfe"],
                             "speedup": r["p50_ms"] / s["p50_ms"], "speedup_over_nfe": r["p50_ms"] / s["p50_ms"] / r["nfe"]})
    overhead = {}
    for b in {r["batch"] for r in res["rows"]}:
        o = by.get(("onnxruntime", "student", b))
        for served in ("triton-grpc", "triton-http", "api"):
            s = by.get((served, "student", b))
            if o and s:
                overhead[f"{served}/batch{b}"] = s["p50_ms"] / o["p50_ms"]
    best = max((r for r in res["rows"] if r["model"] == "student"), key=lambda r: r["mfu"], default=None)
    return {"speedups": speedups, "served_overhead_vs_onnxruntime": overhead,
            "best_student_mfu": None if best is None else {k: best[k] for k in ("backend", "batch", "mfu",
                                                                                  "achieved_gflops")}}


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Latency: one-step student vs multi-step teacher", "",
             f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpu_count')} cores; torch threads "
             f"{res['torch_threads']}; peak (fp32 matmul {res['peak']['matmul_n']}^3, same run): "
             f"{res['peak']['flops_per_s']/1e9:.1f} GFLOP/s.",
             f"FLOPs per image: student {res['flops_per_image']['student']/1e6:.1f} MFLOP; teacher "
             f"{res['flops_per_image']['teacher_denoiser_call']/1e6:.1f} MFLOP per NFE.",
             f"Command: `{res['command']}`  ", f"Revision: {res['git_revision']}", "",
             "| backend | model | NFE | batch | p50 ms | p95 ms | p99 ms | images/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['model']} | {r['nfe']} | {r['batch']} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['images_per_s']:.1f} | {r['mfu']*100:.1f}% |")
    lines += ["", "## Speed-up of the student (teacher p50 / student p50, same backend and batch)", "",
              "| backend | batch | teacher | NFE | speed-up | speed-up / NFE |", "|---|---|---|---|---|---|"]
    for s in res["summary"]["speedups"]:
        lines.append(f"| {s['backend']} | {s['batch']} | {s['teacher']} | {s['nfe']} | {s['speedup']:.1f}x | "
                     f"{s['speedup_over_nfe']:.2f} |")
    lines += ["", "## Served overhead (served p50 / in-process onnxruntime p50, student)", ""]
    for k, v in sorted(res["summary"]["served_overhead_vs_onnxruntime"].items()):
        lines.append(f"- {k}: {v:.2f}x")
    stages = [r for r in res["rows"] if "stages_ms" in r and r["backend"] == "onnxruntime"]
    if stages:
        lines += ["", "## Per-stage breakdown (onnxruntime in-process, ms)", "",
                  "| model | batch | noise | model | uint8+png |", "|---|---|---|---|---|"]
        for r in stages:
            st = r["stages_ms"]
            lines.append(f"| {r['model']} | {r['batch']} | {st['noise']:.2f} | {st['model']:.2f} | {st['uint8+png']:.2f} |")
    if res.get("concurrency"):
        lines += ["", "## Concurrency sweep (student, Triton gRPC, batch 1 per request)", "",
                  "| clients | images/s | p50 ms | p99 ms |", "|---|---|---|---|"]
        for c in res["concurrency"]:
            lines.append(f"| {c['concurrency']} | {c['images_per_s']:.1f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} |")
    if res.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items())]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["backend"] == backend and r["batch"] == 1]
        if not rows:
            continue
        rows.sort(key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rows], [r["p50_ms"] for r in rows], "o-", label=backend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE); 1 = the student")
    ax.set_ylabel("p50 latency, batch 1 (ms)")
    ax.set_title("Student (1 NFE) vs teacher (N NFE), same network")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--student", default="artifacts/fmnist-student.safetensors")
    ap.add_argument("--teacher", default="artifacts/fmnist-teacher.safetensors",
                    help="the student's teacher: our checkpoint or a diffusers model folder")
    ap.add_argument("--teacher-points", default="euler:2,euler:4,euler:8,heun:18",
                    help="teacher sampler:steps points (NFE = steps for euler, 2*steps-1 for heun)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--backends", default="eager,onnxruntime,triton-grpc,triton-http,api",
                    help="eager, compile, onnxruntime, triton-grpc, triton-http, api")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0 = default)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--queue-delay-us", type=int, default=500)
    ap.add_argument("--concurrency", default="1,4,16", help="client counts for the served sweep ('' = none)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, two teacher points, few repeats")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md, STEM.png")


def main_args(args) -> int:
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    if args.quick:
        args.batches, args.teacher_points, args.repeats, args.min_seconds = "1", "euler:2,heun:3", 5, 0.0
        args.concurrency, args.warmup = "1,4", 1
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(f"{out}.json", res)
    atomic_write_bytes(f"{out}.md", to_markdown(res).encode())
    plot(res, Path(f"{out}.png"))
    print(to_markdown(res))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return main_args(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

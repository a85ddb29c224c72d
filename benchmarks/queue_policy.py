"""Does a Triton queue policy cost latency? The student served four ways in ONE server, identical but for the
dynamic batcher's `default_queue_policy`: none, a size bound only, a timeout only, both (the values
`onestep export triton --max-queue-size/--queue-timeout-us` would write). One gRPC client sends batch-1
requests in the pattern an interactive service sees: bursts of `--burst` calls after short idle gaps, then a
back-to-back stretch; the models take turns in interleaved rounds.

Per model: calls, p50, p99 and max latency, the number of calls slower than `--slow-ms` (with a 95% Wilson
interval on their fraction), and Triton's own mean queue time per request (statistics extension). A policy
that makes the batcher hold requests shows up as slow calls whose time is all queue time.

    python -m benchmarks.queue_policy --out benchmarks/results/queue_policy
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> (max_queue_size, queue_timeout_us)
    "student_no_policy": (0, 0),
    "student_size_bound": (256, 0),
    "student_timeout": (0, 30_000_000),
    "student_size_and_timeout": (256, 30_000_000),
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial fraction k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def one_round(client, model: str, n_cls: int, bursts: int, burst: int, gap_s: float, stretch: int,
              seed0: int) -> list[float]:
    lat = []

    def calls(k: int) -> None:
        for _ in range(k):
            seed = seed0 + len(lat)  # a new seed per call: no answer can come from a cache
            t = time.perf_counter()
            client.generate(model, [seed], [seed % n_cls] if n_cls else None)
            lat.append(time.perf_counter() - t)

    for _ in range(bursts):
        time.sleep(gap_s)
        calls(burst)
    calls(stretch)
    return lat


def run(args) -> dict:
    from benchmarks.latency import triton_statistics
    from exporters.onnx_export import export_onnx, read_sidecar
    from exporters.triton_repo import build_repository
    from onestep.provenance import git_revision, machine_info, package_versions
    from serving.client import TritonImageClient
    from serving.triton_server import TritonServer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="onestep-qpolicy-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx = work / "student.onnx"
    if not onnx.exists():
        export_onnx(args.student, onnx)
    n_cls = int(read_sidecar(onnx)["num_classes"])
    repo = work / "repo"
    for name, (size, timeout) in VARIANTS.items():
        build_repository(repo, onnx, name, max_batch=args.max_batch, max_queue_delay_us=0, max_queue_size=size,
                         queue_timeout_us=timeout, with_onnx_platform=False, with_tensor_model=False)
    res = {"machine": machine_info(), "versions": package_versions(), "git_revision": git_revision(),
           "command": "python -m benchmarks.queue_policy " + " ".join(sys.argv[1:]),
           "pattern": {"rounds": args.rounds, "bursts": args.bursts, "burst": args.burst, "gap_s": args.gap_s,
                       "stretch": args.stretch}, "slow_ms": args.slow_ms, "rows": []}
    lat = {name: [] for name in VARIANTS}
    with TritonServer(repo, models=list(VARIANTS), ready_timeout=600) as ts:
        client = TritonImageClient(ts.grpc_url, "grpc")
        stat = TritonImageClient(ts.grpc_url, "grpc").client
        meta = stat.get_server_metadata(as_json=True)
        res["triton_server"] = {"name": meta.get("name"), "version": meta.get("version")}
        for name in VARIANTS:  # warm-up
            for s in range(10):
                client.generate(name, [s], [s % n_cls] if n_cls else None)
        before = {name: triton_statistics(stat, name) for name in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                lat[name] += one_round(client, name, n_cls, args.bursts, args.burst, args.gap_s, args.stretch,
                                       seed0=1_000_000 * (r + 1))
            print(json.dumps({"round": r + 1, "of": args.rounds}), flush=True)
        time.sleep(0.5)  # Triton records a request after its response went out
        after = {name: triton_statistics(stat, name) for name in VARIANTS}
    for name, (size, timeout) in VARIANTS.items():
        d = np.asarray(lat[name]) * 1e3
        slow = int((d > args.slow_ms).sum())
        q_n = after[name]["queue"][0] - before[name]["queue"][0]
        q_ns = after[name]["queue"][1] - before[name]["queue"][1]
        res["rows"].append({"model": name, "max_queue_size": size, "queue_timeout_us": timeout, "calls": int(d.size),
                            "p50_ms": float(np.median(d)), "p99_ms": float(np.percentile(d, 99)),
                            "max_ms": float(d.max()), "slow": slow, "slow_fraction": slow / d.size,
                            "slow_fraction_ci": list(wilson(slow, d.size)),
                            "triton_mean_queue_ms": q_ns / max(q_n, 1) / 1e6})
    return res


def to_markdown(res: dict) -> str:
    p = res["pattern"]
    lines = ["# Triton queue policy vs batch-1 latency (student, gRPC, no queue delay)", "",
             f"Pattern per model and round: {p['bursts']} bursts of {p['burst']} calls after {p['gap_s'] * 1e3:.0f} ms "
             f"idle, then {p['stretch']} back-to-back calls; {p['rounds']} rounds, models interleaved (order "
             f"reversed every other round). Slow: a call over {res['slow_ms']:.0f} ms; [95% Wilson interval].", "",
             "| queue policy | max_queue_size | queue timeout us | calls | p50 ms | p99 ms | max ms | slow calls | "
             "slow fraction | Triton mean queue ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lo, hi = r["slow_fraction_ci"]
        lines.append(f"| {r['model']} | {r['max_queue_size']} | {r['queue_timeout_us']} | {r['calls']} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['slow']} | "
                     f"{r['slow_fraction'] * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}] | "
                     f"{r['triton_mean_queue_ms']:.2f} |")
    m = res["machine"]
    lines += ["", f"Command: `{res['command']}`",
              f"Machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores; {m.get('platform')}; revision "
              f"{res['git_revision']}; Triton server {res.get('triton_server', {}).get('version')} (bundled), "
              f"tritonclient {res['versions'].get('tritonclient')}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="artifacts/fmnist-student.safetensors")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bursts", type=int, default=25)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--gap-s", type=float, default=0.03)
    ap.add_argument("--stretch", type=int, default=100)
    ap.add_argument("--slow-ms", type=float, default=200.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md")
    args = ap.parse_args(argv)
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    res = run(args)
    atomic_write_json(f"{args.out}.json", res)
    md = to_markdown(res)
    atomic_write_bytes(f"{args.out}.md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

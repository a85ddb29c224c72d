"""Dynamic batching chosen by measurement: batch-1 latency and throughput of the student on the real Triton
server at 1, 4 and 16 closed-loop clients, for queue delays of 0, 100, 500 and 1000 microseconds, each with
and without preferred batch sizes.

Every configuration is a copy of the same python-backend student model in ONE server (`student_q<delay>`,
`student_q<delay>_pref`), so all (configuration, clients) paths are interleaved in the same rounds
(benchmarks/stats.py): a path's latency is the median over rounds of its per-round median, its throughput the
median over rounds of images/s, and each ratio against the zero-delay model at the same client count is the
median of per-round ratios with a seeded bootstrap 95% interval. Triton's statistics give the mean batch the
batcher formed. The recommendation (the value for `DEFAULT_MAX_QUEUE_DELAY_US` in exporters/triton_repo.py):
the configuration with the highest throughput at the largest client count among those whose single-client
latency is at most `--latency-budget` above zero delay (upper end of the interval).

    python -m benchmarks.queue_delay --out benchmarks/results/queue_delay
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import stats
from benchmarks.stats import Method, fmt_ci


class ClosedLoop:
    """`clients` threads, each with its own gRPC client, sending batch-1 requests back to back."""

    def __init__(self, url: str, model: str, clients: int, num_classes: int):
        from serving.client import TritonImageClient

        self.model, self.n, self.num_classes = model, clients, num_classes
        self.clients = [TritonImageClient(url, "grpc") for _ in range(clients)]
        self.next_seed = 0

    def _one(self, c, seed: int) -> float:
        t = time.perf_counter()
        c.generate(self.model, [seed], [seed % self.num_classes] if self.num_classes else None)
        return time.perf_counter() - t

    def warmup(self, calls: int) -> None:
        for c in self.clients:
            for _ in range(calls):
                self._one(c, 0)

    def block(self, min_calls: int, seconds: float) -> tuple[list[float], float]:
        """Run until at least `min_calls` calls in all and `seconds` have passed: (latencies, wall seconds)."""
        lats: list[list[float]] = [[] for _ in range(self.n)]
        count = [0]
        lock = threading.Lock()
        start = threading.Barrier(self.n + 1)
        base = self.next_seed
        self.next_seed += 1_000_000

        def worker(i):
            c, s = self.clients[i], base + i * 10_000
            start.wait()
            t_end = time.perf_counter() + seconds
            while True:
                with lock:
                    if count[0] >= min_calls and time.perf_counter() >= t_end:
                        return
                    count[0] += 1
                lats[i].append(self._one(c, s))
                s += 1

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.n)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return sum(lats, []), time.perf_counter() - t0

    def close(self) -> None:
        for c in self.clients:
            c.close()


def measure(paths: dict[str, ClosedLoop], method: Method, stat_client=None, models: dict[str, str] | None = None,
            log=print) -> dict[str, dict]:
    """Interleaved rounds of closed-loop blocks: per path, per round, the latencies, images/s and what Triton
    counted (requests and executions, for the mean batch)."""
    from benchmarks.latency import statistics_after, triton_statistics

    calls, secs = method.per_round()
    for loop in paths.values():
        loop.warmup(method.warmup_calls)
    out = {name: {"latencies": [], "images_per_s": [], "triton": []} for name in paths}
    for r, name in stats.interleaved_order(list(paths), method.rounds):
        loop = paths[name]
        before = triton_statistics(stat_client, models[name]) if stat_client is not None else None
        lats, wall = loop.block(calls, secs)
        if before is not None:
            out[name]["triton"].append(statistics_after(stat_client, models[name], before, len(lats)))
        out[name]["latencies"].append(lats)
        out[name]["images_per_s"].append(len(lats) / wall)
        if log and r == method.rounds - 1:
            log(f"{name}: {sum(map(len, out[name]['latencies']))} calls")
    return out


def summarise_path(m: dict) -> dict:
    med = np.asarray([np.median(x) for x in m["latencies"]]) * 1e3
    allc = np.concatenate([np.asarray(x) for x in m["latencies"]]) * 1e3
    row = {"p50_ms": stats.estimate(med), "p99_ms": float(np.percentile(allc, 99)), "calls": int(allc.size),
           "images_per_s": stats.estimate(m["images_per_s"]), "round_p50_ms": [float(x) for x in med],
           "round_images_per_s": [float(x) for x in m["images_per_s"]]}
    ex = sum(t["executions"] for t in m.get("triton", []))
    if ex:
        row["mean_batch"] = sum(t["inferences"] for t in m["triton"]) / ex
    return row


def concurrency_sweep(url: str, model: str, levels: list[int], num_classes: int, method: Method) -> list[dict]:
    """Closed-loop clients, batch 1 each, against one model over gRPC, the levels interleaved in rounds."""
    loops = {f"c{c}": ClosedLoop(url, model, c, num_classes) for c in levels}
    try:
        m = measure(loops, method)
    finally:
        for loop in loops.values():
            loop.close()
    rows = []
    for c in levels:
        s = summarise_path(m[f"c{c}"])
        rows.append({"concurrency": c, **s})
    return rows


def config_name(delay: int, preferred: bool) -> str:
    return f"student_q{delay}" + ("_pref" if preferred else "")


def recommend(rows: list[dict], latency_budget: float) -> dict | None:
    """The configuration with the highest median throughput at the largest client count, among those whose
    single-client latency ratio to zero delay has its upper bound within 1 + latency_budget (ties: the
    smaller delay, then without preferred sizes)."""
    if not rows:
        return None
    top = max(r["clients"] for r in rows)
    low = min(r["clients"] for r in rows)
    ok = {(r["delay_us"], r["preferred"]) for r in rows if r["clients"] == low
          and (r["delay_us"] == 0 or r["p50_vs_zero_delay"]["ci_high"] <= 1 + latency_budget)}
    cands = [r for r in rows if r["clients"] == top and (r["delay_us"], r["preferred"]) in ok]
    if not cands:
        return None
    best = max(cands, key=lambda r: (round(r["images_per_s"]["median"], 6), -r["delay_us"], not r["preferred"]))
    return {"max_queue_delay_us": best["delay_us"], "preferred_batch_sizes": best["preferred_sizes"],
            "clients": top, "images_per_s": best["images_per_s"], "latency_budget": latency_budget}


def run(args) -> dict:
    from exporters.onnx_export import export_onnx, read_sidecar
    from exporters.triton_repo import build_repository
    from onestep.provenance import git_revision, machine_info, package_versions
    from serving.client import TritonImageClient
    from serving.triton_server import TritonServer

    method = (Method.quick_method() if args.quick else
              Method(min_calls=args.min_calls, window_s=args.window_s, rounds=args.rounds, warmup_calls=args.warmup))
    delays = [int(d) for d in args.delays.split(",")]
    levels = [int(c) for c in args.clients.split(",")]
    pref = tuple(int(p) for p in args.preferred.split(",") if p)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="onestep-qdelay-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx = Path(args.onnx) if args.onnx else work / "student.onnx"
    if not args.onnx and not onnx.exists():
        export_onnx(args.student, onnx)
    n_cls = int(read_sidecar(onnx)["num_classes"])
    repo = work / "repo"
    configs = [(d, False) for d in delays] + [(d, True) for d in delays if d > 0 and pref]
    for d, p in configs:  # one model folder per configuration, all in one repository
        build_repository(repo, onnx, config_name(d, p), max_batch=args.max_batch, max_queue_delay_us=d,
                         preferred_batch_sizes=pref if p else (), intra_op_threads=args.threads,
                         with_onnx_platform=False, with_tensor_model=False)
    res = {"machine": machine_info(), "versions": package_versions(), "git_revision": git_revision(),
           "command": "python -m benchmarks.queue_delay " + " ".join(sys.argv[1:]), "method": method.as_dict(),
           "method_text": method.describe(), "max_batch": args.max_batch, "preferred_sizes": list(pref),
           "load_average_start": _load(), "rows": []}
    names = [config_name(d, p) for d, p in configs]
    with TritonServer(repo, models=names, ready_timeout=600) as ts:
        stat_client = TritonImageClient(ts.grpc_url, "grpc").client
        loops, models = {}, {}
        for (d, p), name in zip(configs, names):
            for c in levels:
                key = f"{name}|c{c}"
                loops[key] = ClosedLoop(ts.grpc_url, name, c, n_cls)
                models[key] = name
        try:
            m = measure(loops, method, stat_client, models)
        finally:
            for loop in loops.values():
                loop.close()
    res["load_average_end"] = _load()
    for (d, p), name in zip(configs, names):
        for c in levels:
            key = f"{name}|c{c}"
            row = {"model": name, "delay_us": d, "preferred": p, "preferred_sizes": list(pref) if p else [],
                   "clients": c, **summarise_path(m[key])}
            zero = m[f"{config_name(0, False)}|c{c}"] if 0 in delays else None
            if zero is not None:
                zmed = [np.median(x) for x in zero["latencies"]]
                row["p50_vs_zero_delay"] = stats.ratio([np.median(x) for x in m[key]["latencies"]], zmed)
                row["throughput_vs_zero_delay"] = stats.ratio(m[key]["images_per_s"], zero["images_per_s"])
            res["rows"].append(row)
    res["recommendation"] = recommend([r for r in res["rows"] if "p50_vs_zero_delay" in r], args.latency_budget)
    return res


def _load():
    from benchmarks.report import load_average

    return load_average()


def to_markdown(res: dict) -> list[str]:
    from benchmarks.report import header_lines

    spread = {}
    for r in res["rows"]:
        spread[f"{r['model']} x{r['clients']} p50"] = r["p50_ms"]
        spread[f"{r['model']} x{r['clients']} images/s"] = r["images_per_s"]
    lines = header_lines("Dynamic batching: queue delay vs batch-1 latency and throughput (student, Triton gRPC)",
                         res, [], stats.spread_notes(spread))
    lines[0] = "No stage tables in this report (requests are timed whole); every figure has its 95% interval."
    lines += [f"Max batch {res['max_batch']}; preferred batch sizes where marked: {res['preferred_sizes']}; "
              f"load average at start {res['load_average_start']}, at end {res['load_average_end']}.", "",
              "| queue delay us | preferred | clients | p50 ms [95% CI] | p99 ms | images/s [95% CI] | mean batch | "
              "p50 vs 0 us | images/s vs 0 us |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mb = f"{r['mean_batch']:.2f}" if r.get("mean_batch") else "-"
        lat = fmt_ci(r["p50_vs_zero_delay"], ".3f", "x") if "p50_vs_zero_delay" in r else "-"
        thr = fmt_ci(r["throughput_vs_zero_delay"], ".3f", "x") if "throughput_vs_zero_delay" in r else "-"
        lines.append(f"| {r['delay_us']} | {','.join(map(str, r['preferred_sizes'])) or '-'} | {r['clients']} | "
                     f"{fmt_ci(r['p50_ms'], '.2f')} | {r['p99_ms']:.2f} | {fmt_ci(r['images_per_s'], '.1f')} | {mb} | "
                     f"{lat} | {thr} |")
    rec = res.get("recommendation")
    lines.append("")
    if rec:
        lines.append(f"Recommended default: `DEFAULT_MAX_QUEUE_DELAY_US = {rec['max_queue_delay_us']}` "
                     f"(preferred batch sizes {rec['preferred_batch_sizes'] or 'none'}): the highest throughput at "
                     f"{rec['clients']} clients among the settings whose 1-client p50 is at most "
                     f"{rec['latency_budget'] * 100:.0f}% above zero delay (upper end of its interval).")
    else:
        lines.append("No recommendation: no setting kept the single-client latency within the budget.")
    return lines


def main(argv=None) -> int:
    from benchmarks.report import write_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="artifacts/fmnist-student.safetensors")
    ap.add_argument("--onnx", default=None, help="an exported student ONNX (skips the export)")
    ap.add_argument("--delays", default="0,100,500,1000", help="queue delays in microseconds (include 0)")
    ap.add_argument("--clients", default="1,4,16", help="closed-loop client counts")
    ap.add_argument("--preferred", default="4,16", help="preferred batch sizes of the *_pref variants ('' = none)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads per model (0 = default)")
    ap.add_argument("--min-calls", type=int, default=200)
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--latency-budget", type=float, default=0.05,
                    help="largest single-client latency increase over zero delay a recommendation may cost")
    ap.add_argument("--quick", action="store_true", help="same method, short windows (indicative figures)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md")
    args = ap.parse_args(argv)
    res = run(args)
    write_report(args.out, res, to_markdown(res))
    print(json.dumps({"recommendation": res["recommendation"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

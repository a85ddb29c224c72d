"""Triton's response cache on the deterministic (seed, label) -> image student: a repeated request vs a new one.

A second Triton starts on the same repository with a bounded in-memory response cache (`onestep serve` runs with
one). Two paths over gRPC, interleaved in rounds with the measuring method of benchmarks/stats.py:
- repeat: the same (seed, label) on every call (answered once before timing, so every timed call is a hit);
- new: a new seed on every call (a miss: computed by the model, then inserted).
Triton's statistics around each block give, per request, the server-side time of a hit (`cache_hit`: lookup and
response copy) and of a miss's lookup plus insert (`cache_miss`), beside the client's round trip.

    python -m benchmarks.response_cache --repo runs/demo/model_repository --model fmnist_student
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from benchmarks import stats

CACHE_KEYS = ("success", "cache_hit", "cache_miss")


def cache_statistics(client, model: str) -> dict:
    """Cumulative (count, ns) of successful requests, cache hits and cache misses of one model."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("inference_stats", {})
    return {k: (int(s.get(k, {}).get("count", 0)), int(s.get(k, {}).get("ns", 0))) for k in CACHE_KEYS}


def cache_hook(client, model: str, timeout_s: float = 2.0):
    """(before, after) for stats.run_interleaved: hits, misses and their server-side ns within one block.
    Triton records a request after its response is out, so `after` waits until the block's calls are counted."""
    def after(before: dict, calls: int) -> dict:
        deadline = time.perf_counter() + timeout_s
        while True:
            now = cache_statistics(client, model)
            if now["success"][0] - before["success"][0] >= calls or time.perf_counter() > deadline:
                return {k: (now[k][0] - before[k][0], now[k][1] - before[k][1]) for k in CACHE_KEYS}
            time.sleep(0.001)

    return (lambda: cache_statistics(client, model)), after


def _per_request_us(pr: stats.PathResult, key: str) -> list[float]:
    return [e[key][1] / e[key][0] / 1e3 for e in pr.extra if e[key][0]]


def measure(repo, model: str, n_cls: int, method: stats.Method, cache_mib: int = 64) -> dict:
    """Repeat vs new requests (batch 1) on a Triton started with a `cache_mib` response cache."""
    from serving.client import TritonImageClient
    from serving.triton_server import TritonServer

    lab = (lambda s: np.array([[s % n_cls]], np.int64)) if n_cls else (lambda s: None)
    with TritonServer(repo, models=[model], ready_timeout=600, response_cache_bytes=cache_mib << 20) as ts:
        c = TritonImageClient(ts.grpc_url, "grpc")
        try:
            def call(seed: int) -> np.ndarray:
                return c.generate(model, np.array([[seed]], np.int64), lab(seed))

            first = call(7)
            if call(7).tobytes() != first.tobytes():
                raise RuntimeError(f"{model}: a repeated request answered different bytes")
            fresh = itertools.count(1_000_000)
            paths = {"repeat": lambda: call(7), "new": lambda: call(next(fresh))}
            hooks = {k: cache_hook(c.client, model) for k in paths}
            results = stats.run_interleaved(paths, method, hooks)
        finally:
            c.close()
    rep, new = results["repeat"], results["new"]
    hits = sum(e["cache_hit"][0] for e in rep.extra)
    misses_in_repeat = sum(e["cache_miss"][0] for e in rep.extra)
    rt_rep = np.asarray(rep.round_medians()) * 1e3
    rt_new = np.asarray(new.round_medians()) * 1e3
    return {"model": model, "cache_mib": cache_mib, "batch": 1, "repeat_calls": int(rep.all_calls().size),
            "hits": hits, "misses_in_repeat": misses_in_repeat,
            "misses_in_new": sum(e["cache_miss"][0] for e in new.extra),
            "triton_hit_us": stats.estimate(_per_request_us(rep, "cache_hit")),
            "triton_miss_lookup_insert_us": stats.estimate(_per_request_us(new, "cache_miss")),
            "round_trip_repeat_ms": stats.estimate(rt_rep), "round_trip_new_ms": stats.estimate(rt_new),
            "new_over_repeat": stats.ratio(rt_new, rt_rep)}


def to_markdown(f: dict) -> list[str]:
    """The section the latency report carries."""
    return ["## Response cache (student, Triton gRPC, batch 1, server with a "
            f"{f['cache_mib']} MiB response cache)", "",
            f"A repeated request (same seed and label) against a new seed on every call, interleaved; the repeat "
            f"path's {f['repeat_calls']} timed calls were {f['hits']} cache hits and {f['misses_in_repeat']} misses.",
            "", "| figure | value [95% CI] |", "|---|---|",
            f"| Triton: a cache hit, per request (us) | {stats.fmt_ci(f['triton_hit_us'], '.1f')} |",
            f"| Triton: a miss's lookup + insert, per request (us) | "
            f"{stats.fmt_ci(f['triton_miss_lookup_insert_us'], '.1f')} |",
            f"| client round trip, repeated request (ms) | {stats.fmt_ci(f['round_trip_repeat_ms'], '.3f')} |",
            f"| client round trip, new seed (ms) | {stats.fmt_ci(f['round_trip_new_ms'], '.3f')} |",
            f"| new / repeated round trip | {stats.fmt_ci(f['new_over_repeat'], '.2f', 'x')} |", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="a model repository (onestep export triton / onestep demo)")
    ap.add_argument("--model", default="fmnist_student")
    ap.add_argument("--classes", type=int, default=10, help="labels are seed mod this (0 = unconditional)")
    ap.add_argument("--cache-mib", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    method = stats.Method.quick_method() if args.quick else stats.Method()
    print("\n".join(to_markdown(measure(args.repo, args.model, args.classes, method, args.cache_mib))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

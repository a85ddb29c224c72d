"""Reliability run against the REAL local Triton server and the HTTP API (loopback only, bounded in time):

- load: closed-loop clients for a fixed duration below the API's in-flight limit (expect zero errors), then
  above it (expect only 429 with Retry-After, never 5xx); p50/p99 and the API process's RSS before/after;
- fault: Triton killed (SIGKILL) in the middle of a load phase -> 503s, restarted on the same ports -> the
  API recovers without being restarted; counts of each status;
- bad input: a fixed list of malformed requests, each must get a 4xx with a message.
Writes JSON + markdown. `make reliability` (or `python -m benchmarks.reliability`) runs it; the short form
runs in the test suite (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BAD_INPUTS = [
    ({"model": "../../../etc/passwd", "seeds": [1]}, "path traversal in model name"),
    ({"model": "tiny/../tiny", "seeds": [1]}, "slash in model name"),
    ({"model": "nope", "seeds": [1]}, "unknown model"),
    ({"model": "tiny", "seeds": [-5]}, "negative seed"),
    ({"model": "tiny", "seeds": [2**63]}, "seed past int64"),
    ({"model": "tiny", "seeds": [1], "label": 10}, "label out of range"),
    ({"model": "tiny", "seeds": [1], "label": -1}, "negative label"),
    ({"model": "tiny", "n": 100000}, "too many images"),
    ({"model": "tiny", "n": 0}, "zero images"),
    ({"model": "tiny", "seeds": []}, "empty seeds"),
    ({"model": "tiny", "seeds": "1,2"}, "seeds of the wrong type"),
    ({"model": "tiny", "seeds": [1], "format": "bmp"}, "unknown format"),
    ({"model": "tiny", "n": 3, "response": "image"}, "direct image for several pictures"),
    ({"model": "tiny", "seeds": [1, 2], "labels": [1]}, "labels/seeds length mismatch"),
    ({}, "empty body"),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_phase(url: str, model: str, clients: int, seconds: float, batch: int = 1, n_cls: int = 10,
               on_tick=None) -> dict:
    from serving.client import APIClient, APIError

    stop = time.perf_counter() + seconds
    statuses: Counter = Counter()
    lat: list[float] = []
    retry_after_missing = 0
    lock = threading.Lock()

    def worker(i):
        nonlocal retry_after_missing
        c = APIClient(url, timeout_s=30)
        s = i * 1_000_000
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                c.generate(model, list(range(s, s + batch)), [x % n_cls for x in range(s, s + batch)])
                code = 200
            except APIError as e:
                code = e.status
            except OSError:
                code = -1
            with lock:
                statuses[code] += 1
                if code == 200:
                    lat.append(time.perf_counter() - t)
            s += batch
            if code in (429, 503):
                time.sleep(0.01)

    rss0 = _rss_mb()
    ticker = None
    if on_tick:
        ticker = threading.Thread(target=on_tick, daemon=True)
        ticker.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    if ticker:
        ticker.join(60)
    a = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {"clients": clients, "seconds": wall, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "ok_per_s": statuses[200] / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "rss_mb_before": rss0, "rss_mb_after": _rss_mb()}


def _wait_ready(url: str, timeout: float) -> float:
    """Seconds until the API's /readyz says 200 again (the gRPC channel reconnects with back-off)."""
    from serving.client import APIClient, APIError

    c, t0 = APIClient(url), time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            c._req("GET", "/readyz")
            return time.perf_counter() - t0
        except (APIError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"the API did not become ready within {timeout} s after Triton restarted")


def bad_inputs(url: str, model: str) -> list[dict]:
    from serving.client import APIClient, APIError

    c = APIClient(url)
    out = []
    for body, what in BAD_INPUTS:
        if body.get("model") == "tiny":  # the served model, so each case reaches the check it is about
            body = {**body, "model": model}
        try:
            c._req("POST", "/v1/generate", body)
            out.append({"case": what, "status": 200, "ok": False})
        except APIError as e:
            out.append({"case": what, "status": e.status, "message": json.dumps(e.detail)[:160],
                        "ok": 400 <= e.status < 500 and bool(e.detail)})
    return out


def run(repo: Path, model: str, seconds: float, limit: int, out: Path | None = None) -> dict:
    from onestep.provenance import git_revision, machine_info
    from serving.api import APISettings
    from serving.background import APIThread
    from serving.triton_server import TritonServer

    res: dict = {"machine": machine_info(), "git_revision": git_revision(), "model": model, "limit": limit}
    ts = TritonServer(repo, models=[model], ready_timeout=120).start()
    api = APIThread(APISettings(triton_url=ts.grpc_url, repository=str(repo), served=[model], max_inflight=limit,
                                request_timeout_s=10)).start()
    url = api.url
    try:
        load_phase(url, model, 2, 1.0)  # warm-up
        res["below_limit"] = load_phase(url, model, max(1, limit // 2), seconds)
        res["above_limit"] = load_phase(url, model, limit * 4, seconds, batch=8)

        def kill_and_restart():
            time.sleep(seconds / 3)
            ts.kill()
            time.sleep(seconds / 3)
            ts.stop()
            ts.start()

        res["triton_killed"] = load_phase(url, model, max(1, limit // 2), seconds * 2, on_tick=kill_and_restart)
        res["recovery_seconds_after_phase"] = _wait_ready(url, 60.0)
        res["after_recovery"] = load_phase(url, model, max(1, limit // 2), min(seconds, 3.0))
        res["bad_inputs"] = bad_inputs(url, model)
    finally:
        api.stop()
        ts.stop()
    res["verdict"] = verdict(res)
    if out:
        from onestep.provenance import atomic_write_bytes, atomic_write_json

        atomic_write_json(f"{out}.json", res)
        atomic_write_bytes(f"{out}.md", to_markdown(res).encode())
    return res


def verdict(res: dict) -> dict:
    below = res["below_limit"]["statuses"]
    above = res["above_limit"]["statuses"]
    killed = res["triton_killed"]["statuses"]
    rec = res["after_recovery"]["statuses"]
    return {
        "below_limit_zero_errors": set(below) == {"200"},
        "above_limit_only_429": set(above) <= {"200", "429"} and "429" in above,
        "killed_gives_503_not_5xx_others": "503" in killed and set(killed) <= {"200", "503", "429"},
        "recovered_without_api_restart": set(rec) == {"200"},
        "bad_inputs_all_4xx_with_message": all(b["ok"] for b in res["bad_inputs"]),
        "rss_growth_mb_under_load": res["above_limit"]["rss_mb_after"] - res["below_limit"]["rss_mb_before"],
    }


def to_markdown(res: dict) -> str:
    lines = ["# Reliability run (real local Triton + HTTP API, loopback)", "",
             f"Model `{res['model']}`, API in-flight limit {res['limit']}. Revision {res['git_revision']}.", "",
             "| phase | clients | seconds | statuses | ok/s | p50 ms | p99 ms | RSS MB before -> after |",
             "|---|---|---|---|---|---|---|---|"]
    for k in ("below_limit", "above_limit", "triton_killed", "after_recovery"):
        r = res[k]
        lines.append(f"| {k} | {r['clients']} | {r['seconds']:.1f} | {r['statuses']} | {r['ok_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rss_mb_before']:.0f} -> {r['rss_mb_after']:.0f} |")
    lines += ["", f"After the restart, /readyz answered 200 within {res['recovery_seconds_after_phase']:.2f} s "
              "of the end of the fault phase; the API process was never restarted.",
              "", "| bad input | status | message |", "|---|---|---|"]
    for b in res["bad_inputs"]:
        lines.append(f"| {b['case']} | {b['status']} | {b.get('message', '').replace('|', '/')} |")
    lines += ["", "Verdict: " + ", ".join(f"{k}={v}" for k, v in res["verdict"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="model repository (onestep export triton)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--limit", type=int, default=8, help="the API's max in-flight requests")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = run(Path(args.repo), args.model, args.seconds, args.limit, Path(args.out))
    print(to_markdown(res))
    return 0 if all(v for k, v in res["verdict"].items() if isinstance(v, bool)) else 1


if __name__ == "__main__":
    sys.exit(main())

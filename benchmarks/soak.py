"""Soak: `onestep serve` (the real local Triton + the HTTP API, started as its own process) under steady load
below its in-flight limit for a long time, with the memory of every serving process recorded over time.

- Load: `--clients` threads (default: half the API's `--limit`), each sending one-image POST /v1/generate
  requests with new seeds (so no answer can come from a cache), back to back or paced to `--rate` requests/s
  in all. Every request's completion time, latency and status are kept.
- Memory: every `--sample-s` seconds, VmRSS (and RssAnon, RssShmem) from /proc/<pid>/status of the `onestep
  serve` process (the API), of its `tritonserver` child and of Triton's python-backend stub processes (one per
  model instance), found by walking /proc's parent links; also the request rate and errors since the last
  sample.
- Verdict: per process, the memory slope over the SECOND half of the run (warm-up growth excluded) in MiB per
  minute: least squares, with a 95% interval from a seeded moving-block bootstrap of the residuals (blocks of
  about sqrt(n) samples, so the interval respects that successive samples are not independent). A process is
  `flat` when the interval's upper end is at most `--tolerance-mib-per-min`, `growing` when its lower end is
  above it, `inconclusive` otherwise (too noisy to say, or a second half shorter than 2 minutes). The run
  passes when every process is flat and no request failed (any status but 200, or a connection error).
- Report: STEM.json (every sample and request count), STEM.md (verdict first, then the memory table and the
  per-minute table: requests, rate, statuses, p50/p99) and STEM.png (memory vs time, the fitted second-half
  slopes, the request rate).

    python -m benchmarks.soak --repo runs/demo/model_repository --model fmnist_student --minutes 10 \\
        --limit 8 --out benchmarks/results/soak
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, LEVEL

ROLES = ("api", "triton", "stubs")  # the processes the verdict is about
DEFAULT_TOLERANCE_MIB_PER_MIN = 1.0
MIN_WINDOW_MINUTES = 2.0  # a second half shorter than this gives no memory verdict (too short to see a leak)
STUB_PREFIX = "triton_python"  # comm of triton_python_backend_stub, cut to 15 characters by the kernel


# --- /proc ---------------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssFile, RssShmem of a process in KiB (None when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return None
    return out


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, comm) of every process visible in /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        lpar, rpar = stat.find("("), stat.rfind(")")
        fields = stat[rpar + 2:].split()
        table[int(d)] = (int(fields[1]), stat[lpar + 1:rpar])
    return table


def serving_processes(root: int, table: dict[int, tuple[int, str]] | None = None) -> dict[str, list[int]]:
    """The `onestep serve` process `root` (role api), the tritonserver processes below it (triton) and the
    python-backend stubs below those (stubs); anything else below root is `other`."""
    table = process_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    roles: dict[str, list[int]] = {"api": [root], "triton": [], "stubs": [], "other": []}
    todo = list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        comm = table[pid][1]
        if comm == "tritonserver":
            roles["triton"].append(pid)
        elif comm.startswith(STUB_PREFIX):
            roles["stubs"].append(pid)
        else:
            roles["other"].append(pid)
        todo += kids.get(pid, [])
    return {k: sorted(v) for k, v in roles.items()}


def memory_sample(root: int) -> dict:
    """MiB per role (VmRSS summed over the role's processes; RssAnon and RssShmem beside it) and the pids."""
    roles = serving_processes(root)
    out: dict = {"pids": roles}
    for role, pids in roles.items():
        st = [s for s in (proc_status(p) for p in pids) if s]
        out[role] = {k: sum(s.get(k, 0) for s in st) / 1024 for k in ("VmRSS", "RssAnon", "RssShmem")}
        out[role]["processes"] = len(st)
    out["client"] = {k: v / 1024 for k, v in (proc_status(os.getpid()) or {}).items()}
    return out


# --- the verdict -----------------------------------------------------------------------------------------------


def slope_per_minute(t_s, y_mib, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = LEVEL, block: int | None = None) -> dict:
    """Least-squares slope of y (MiB) against t (seconds) in MiB per minute, with a percentile interval from a
    moving-block bootstrap of the residuals (blocks of `block` samples, default round(sqrt(n)))."""
    t = np.asarray(t_s, dtype=np.float64) / 60.0
    y = np.asarray(y_mib, dtype=np.float64)
    n = t.size
    if n < 3 or np.ptp(t) == 0:
        return {"slope": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "samples": int(n),
                "block": 0, "minutes": float(np.ptp(t)) if n else 0.0}
    tc = t - t.mean()
    slope = float(tc @ (y - y.mean()) / (tc @ tc))
    fit = y.mean() + slope * tc
    resid = y - fit
    L = int(block or max(1, round(math.sqrt(n))))
    L = min(L, n)
    rng = np.random.default_rng(seed)
    nb = math.ceil(n / L)
    starts = rng.integers(0, n - L + 1, size=(samples, nb))
    idx = (starts[:, :, None] + np.arange(L)).reshape(samples, -1)[:, :n]
    ystar = fit + resid[idx]
    slopes = (ystar - ystar.mean(axis=1, keepdims=True)) @ tc / (tc @ tc)
    lo, hi = np.quantile(slopes, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"slope": slope, "ci_low": float(min(lo, slope)), "ci_high": float(max(hi, slope)), "samples": int(n),
            "block": L, "minutes": float(np.ptp(t))}


def memory_verdict(slope: dict, tolerance: float) -> str:
    """'flat' when growth faster than `tolerance` MiB/min is ruled out, 'growing' when growth faster than it is
    certain, 'inconclusive' otherwise."""
    if not np.isfinite(slope["ci_high"]):
        return "inconclusive"
    if slope["ci_high"] <= tolerance:
        return "flat"
    if slope["ci_low"] > tolerance:
        return "growing"
    return "inconclusive"


def verdict(samples: list[dict], statuses: dict[str, int], duration_s: float, tolerance: float,
            serve_exit: int | None = None) -> dict:
    """Second-half slope and verdict per role, error counts, and whether the run passes."""
    half = duration_s / 2
    late = [s for s in samples if s["t_s"] >= half]
    memory = {}
    for role in ROLES + ("total",):
        ts = [s["t_s"] for s in late if s.get("memory_mib", {}).get(role) is not None]
        ys = [s["memory_mib"][role] for s in late if s.get("memory_mib", {}).get(role) is not None]
        sl = slope_per_minute(ts, ys)
        judged = memory_verdict(sl, tolerance) if sl["minutes"] >= MIN_WINDOW_MINUTES else "inconclusive"
        memory[role] = {**sl, "verdict": judged,
                        "start_mib": samples[0]["memory_mib"][role] if samples else None,
                        "end_mib": samples[-1]["memory_mib"][role] if samples else None}
    errors = {k: v for k, v in statuses.items() if k != "200"}
    n_err = sum(errors.values())
    return {"tolerance_mib_per_min": tolerance, "window": f"second half (t >= {half:.0f} s)", "memory": memory,
            "errors": n_err, "errors_by_status": errors, "requests": sum(statuses.values()),
            "serve_exited_early": serve_exit,
            "memory_flat": all(memory[r]["verdict"] == "flat" for r in ROLES),
            "passed": all(memory[r]["verdict"] == "flat" for r in ROLES) and n_err == 0 and serve_exit is None}


def per_minute(requests: list[tuple[float, float, int]], duration_s: float) -> list[dict]:
    """(completion s, latency s, status) -> per minute: requests, rate, statuses, p50/p99 of the 200s (ms)."""
    out = []
    n = max(1, math.ceil(duration_s / 60))
    for m in range(n):
        lo, hi = 60.0 * m, min(60.0 * (m + 1), duration_s)
        last = m == n - 1  # the requests still in flight at the end finish after it: they count in the last minute
        rows = [r for r in requests if lo <= r[0] and (r[0] < hi or last)]
        ok = np.asarray([r[1] for r in rows if r[2] == 200]) * 1e3
        st = Counter(str(r[2]) for r in rows)
        out.append({"minute": m, "from_s": lo, "to_s": hi, "requests": len(rows),
                    "per_s": len(rows) / (hi - lo) if hi > lo else float("nan"),
                    "statuses": dict(sorted(st.items())),
                    "p50_ms": float(np.percentile(ok, 50)) if ok.size else None,
                    "p99_ms": float(np.percentile(ok, 99)) if ok.size else None})
    return out


# --- running it ------------------------------------------------------------------------------------------------


class Serve:
    """`onestep serve` as a child process on loopback (its own Triton below it), stopped with SIGTERM."""

    def __init__(self, repo: Path, model: str, limit: int, port: int, cache_mib: int, log_path: Path,
                 ready_timeout: float = 300.0):
        from serving.triton_server import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "onestep.cli", "serve", "--repo", str(repo), "--models", model,
                    "--host", "127.0.0.1", "--port", str(self.port), "--max-inflight", str(limit),
                    "--response-cache-mib", str(cache_mib), "--drain", "0", "--timeout", "30",
                    "--ready-timeout", str(ready_timeout)]
        self.log_path, self.ready_timeout = log_path, ready_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Serve":
        env = {k: v for k, v in os.environ.items() if k not in ("ONESTEP_API_KEY", "ONESTEP_API_KEY_FILE")}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.ready_timeout + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"onestep serve exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"onestep serve not ready after {self.ready_timeout + 30:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM (serve stops its Triton), SIGKILL after a minute; a tritonserver left behind is killed too."""
        if self.proc is None:
            return None
        triton = serving_processes(self.proc.pid)["triton"] if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in triton:  # our own child's child, by pid
            if proc_status(pid) is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)  # Triton runs in its own session, stubs included
                except ProcessLookupError:
                    pass
        self._log.close()
        return self.proc.returncode


def run_load(url: str, model: str, clients: int, seconds: float, rate: float, n_cls: int, t0: float,
             requests: list, lock: threading.Lock, stop: threading.Event) -> None:
    """`clients` threads sending one-image requests until `seconds` after t0 (or `stop`); each request's
    (completion s since t0, latency s, status) is appended to `requests` (status -1: connection error)."""
    from serving.client import APIClient, APIError

    interval = clients / rate if rate > 0 else 0.0

    def worker(i: int) -> None:
        c = APIClient(url, timeout_s=60)
        seed = i * 1_000_000_000
        due = t0 + (i / clients) * interval
        while not stop.is_set():
            now = time.perf_counter()
            if now - t0 >= seconds:
                return
            if interval:
                if due > now:
                    time.sleep(due - now)
                due = max(due + interval, time.perf_counter())  # no catch-up bursts after a slow answer
            t = time.perf_counter()
            try:
                c.generate(model, [seed], [seed % n_cls] if n_cls else None)
                code = 200
            except APIError as e:
                code = e.status
            except OSError:
                code = -1
            done = time.perf_counter()
            with lock:
                requests.append((done - t0, done - t, code))
            seed += 1
            if code != 200:
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"soak-client-{i}")
               for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run(repo: Path, model: str, minutes: float, limit: int = 8, clients: int | None = None, rate: float = 0.0,
        sample_s: float = 5.0, tolerance: float = DEFAULT_TOLERANCE_MIB_PER_MIN, cache_mib: int = 0, port: int = 0,
        out: Path | None = None, log=print) -> dict:
    from benchmarks.report import load_average
    from onestep.provenance import git_revision, machine_info
    from serving.client import APIClient

    clients = clients or max(1, limit // 2)
    if clients >= limit:
        raise ValueError(f"{clients} clients would reach the in-flight limit {limit}: a soak stays below it")
    seconds = minutes * 60.0
    log_path = Path(f"{out}.serve.log") if out else Path(f"/tmp/onestep-soak-{os.getpid()}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    serve = Serve(Path(repo), model, limit, port, cache_mib, log_path).start()
    res: dict = {"machine": machine_info(), "git_revision": git_revision(), "command": "python -m benchmarks.soak "
                 + " ".join(sys.argv[1:]), "model": model, "repo": str(repo), "limit": limit, "clients": clients,
                 "rate_per_s": rate or None, "minutes": minutes, "sample_s": sample_s, "response_cache_mib": cache_mib,
                 "serve_command": " ".join(serve.cmd[1:]), "serve_log": str(log_path),
                 "load_average_start": load_average(), "samples": []}
    requests: list[tuple[float, float, int]] = []
    lock, stop = threading.Lock(), threading.Event()
    serve_exit = None
    try:
        info = {m["name"]: m for m in APIClient(serve.url).models()}
        n_cls = int(info[model].get("num_classes") or 0)
        APIClient(serve.url).generate(model, [0], [0] if n_cls else None)  # one request before the clock starts
        t0 = time.perf_counter()
        load = threading.Thread(target=run_load, args=(serve.url, model, clients, seconds, rate, n_cls, t0,
                                                       requests, lock, stop), daemon=True)
        load.start()
        seen = 0
        t_prev = 0.0
        while True:
            t = time.perf_counter() - t0
            mem = memory_sample(serve.proc.pid)
            with lock:
                new = requests[seen:]
                seen = len(requests)
            mib = {r: mem[r]["VmRSS"] for r in ROLES}
            mib["total"] = sum(mib.values())
            st = Counter(str(c) for _, _, c in new)
            sample = {"t_s": t, "memory_mib": mib, "rss_anon_mib": {r: mem[r]["RssAnon"] for r in ROLES},
                      "rss_shmem_mib": {r: mem[r]["RssShmem"] for r in ROLES},
                      "processes": {r: mem[r]["processes"] for r in ROLES}, "pids": mem["pids"],
                      "client_mib": mem["client"].get("VmRSS"), "requests": len(new),
                      "per_s": len(new) / (t - t_prev) if t > t_prev else 0.0, "statuses": dict(st)}
            res["samples"].append(sample)
            t_prev = t
            log(json.dumps({"t_s": round(t, 1), "mib": {k: round(v, 1) for k, v in mib.items()},
                            "per_s": round(sample["per_s"], 1), "statuses": dict(st)}))
            if serve.proc.poll() is not None:
                serve_exit = serve.proc.returncode
                stop.set()
                break
            if not load.is_alive() or t >= seconds:
                break
            time.sleep(max(0.0, min(sample_s, seconds - t) - (time.perf_counter() - t0 - t)))
        stop.set()
        load.join(120)
    finally:
        stop.set()
        res["serve_exit_code_at_stop"] = serve.stop()
    duration = seconds
    statuses = Counter(str(c) for _, _, c in requests)
    ok = np.asarray([lat for _, lat, c in requests if c == 200]) * 1e3
    res["duration_s"] = duration
    res["statuses"] = dict(sorted(statuses.items()))
    res["overall"] = {"requests": len(requests), "per_s": len(requests) / duration,
                      "p50_ms": float(np.percentile(ok, 50)) if ok.size else None,
                      "p99_ms": float(np.percentile(ok, 99)) if ok.size else None}
    res["per_minute"] = per_minute(requests, duration)
    res["load_average_end"] = load_average()
    res["verdict"] = verdict(res["samples"], res["statuses"], duration, tolerance, serve_exit)
    if out:
        from onestep.provenance import atomic_write_bytes, atomic_write_json

        atomic_write_json(f"{out}.json", res)
        atomic_write_bytes(f"{out}.md", to_markdown(res).encode())
        plot(res, Path(f"{out}.png"))
    return res


def _fmt_slope(m: dict) -> str:
    if not np.isfinite(m["slope"]):
        return "n/a (too few samples)"
    return f"{m['slope']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]"


def to_markdown(res: dict) -> str:
    from benchmarks.report import machine_line

    v = res["verdict"]
    per_role = ", ".join(f"{r} {v['memory'][r]['verdict']}" for r in ROLES)
    head = ("**PASSED**: every serving process's memory is flat and no request failed." if v["passed"] else
            f"**NOT PASSED**: memory {'flat' if v['memory_flat'] else 'not shown flat'} ({per_role}); "
            f"{v['errors']} failed requests"
            + (f"; onestep serve exited early with {v['serve_exited_early']}" if v["serve_exited_early"] is not None
               else "") + ".")
    load = "closed loop" if not res["rate_per_s"] else f"paced to {res['rate_per_s']:g} requests/s in all"
    lines = [head, "", "# Soak: `onestep serve` under steady load (real local Triton + HTTP API, loopback)", "",
             machine_line(res["machine"]) + f" Load average (1/5/15 min) at start {res['load_average_start']}, "
             f"at end {res['load_average_end']}.", "",
             f"Model `{res['model']}`; API in-flight limit {res['limit']}, {res['clients']} clients ({load}), one "
             f"image per request, new seeds throughout; Triton response cache {res['response_cache_mib']} MiB; "
             f"{res['minutes']:g} minutes; memory sampled every {res['sample_s']:g} s ({len(res['samples'])} "
             f"samples) from /proc/<pid>/status (VmRSS).", "",
             f"Requests: {res['overall']['requests']} ({res['overall']['per_s']:.1f}/s), statuses {res['statuses']}, "
             f"p50 {_ms(res['overall']['p50_ms'])} ms, p99 {_ms(res['overall']['p99_ms'])} ms.", "",
             f"## Memory (VmRSS, MiB); slope over the {v['window']}, MiB/min [95% CI, moving-block bootstrap of "
             f"the least-squares residuals]; flat = upper end <= {v['tolerance_mib_per_min']:g} MiB/min", "",
             "| process | processes | start MiB | end MiB | slope MiB/min [95% CI] | samples | verdict |",
             "|---|---|---|---|---|---|---|"]
    procs = res["samples"][-1]["processes"] if res["samples"] else {}
    names = {"api": "API (`onestep serve`)", "triton": "tritonserver", "stubs": "python-backend stubs",
             "total": "all three"}
    for role in ROLES + ("total",):
        m = v["memory"][role]
        n_proc = procs.get(role, "") if role != "total" else sum(procs.values()) if procs else ""
        lines.append(f"| {names[role]} | {n_proc} | {_mib(m['start_mib'])} | {_mib(m['end_mib'])} | "
                     f"{_fmt_slope(m)} | {m['samples']} | {m['verdict'] if role != 'total' else '(not judged)'} |")
    lines += ["", "## Per minute", "", "| minute | requests | per s | statuses | p50 ms | p99 ms |",
              "|---|---|---|---|---|---|"]
    for r in res["per_minute"]:
        lines.append(f"| {r['minute']} ({r['from_s']:.0f}-{r['to_s']:.0f} s) | {r['requests']} | {r['per_s']:.1f} | "
                     f"{r['statuses']} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} |")
    lines += ["", f"Errors (any status but 200; -1 = connection error): {v['errors']} {v['errors_by_status'] or ''}",
              "", f"Command: `{res['command']}`  ",
              f"Served with: `onestep {res['serve_command'].split(' ', 2)[-1]}`  ",
              f"Revision: {res['git_revision']}", ""]
    return "\n".join(lines)


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    t = np.asarray([x["t_s"] for x in s]) / 60.0
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    half = res["duration_s"] / 2 / 60.0
    labels = {"api": "API (onestep serve)", "triton": "tritonserver", "stubs": "python-backend stubs"}
    for role in ROLES:
        y = np.asarray([x["memory_mib"][role] for x in s])
        (line,) = ax.plot(t, y, ".-", label=labels[role])
        m = res["verdict"]["memory"][role]
        if np.isfinite(m["slope"]):
            late = t >= half
            tm = t[late].mean()
            ym = y[late].mean()
            ax.plot(t[late], ym + m["slope"] * (t[late] - tm), "--", color=line.get_color(), alpha=0.8,
                    label=f"{m['slope']:+.2f} MiB/min [{m['ci_low']:+.2f}, {m['ci_high']:+.2f}]: {m['verdict']}")
    ax.axvspan(half, t.max() if t.size else half, color="grey", alpha=0.08, lw=0)
    ax.set_ylabel("VmRSS (MiB)")
    ax.set_title(f"Soak of {res['model']}: memory over time (shaded: the half the slope is fitted on)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax2.plot(t, [x["per_s"] for x in s], ".-", color="black", label="requests/s")
    errs = [sum(v for k, v in x["statuses"].items() if k != "200") for x in s]
    if any(errs):
        ax2.bar(t, errs, width=0.01 * max(t.max(), 1), color="red", label="errors in the interval")
    ax2.set_xlabel("minutes since the load started")
    ax2.set_ylabel("requests/s")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="model repository (onestep export triton)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=10.0, help="duration of the load")
    ap.add_argument("--limit", type=int, default=8, help="the API's max in-flight requests (--max-inflight)")
    ap.add_argument("--clients", type=int, default=0, help="load threads (default: limit // 2; must stay below it)")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s in all (0 = each client back to back)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--tolerance-mib-per-min", type=float, default=DEFAULT_TOLERANCE_MIB_PER_MIN)
    ap.add_argument("--response-cache-mib", type=int, default=0,
                    help="Triton's response cache (default 0: off, so Triton's memory is the models'; with new seeds "
                         "on every request a cache would only fill up to this size)")
    ap.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    ap.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md, STEM.png (and STEM.serve.log)")
    args = ap.parse_args(argv)
    res = run(Path(args.repo), args.model, args.minutes, args.limit, args.clients or None, args.rate, args.sample_s,
              args.tolerance_mib_per_min, args.response_cache_mib, args.port, Path(args.out))
    print(to_markdown(res))
    return 0 if res["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

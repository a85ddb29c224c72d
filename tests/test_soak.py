"""The soak's arithmetic (second-half memory slope with its interval, the verdict, the per-minute table) on
series with known answers, the /proc process walk on this test process, and a short real soak against the tiny
models behind `onestep serve` (the long one: `python -m benchmarks.soak --minutes 10`, see its docstring)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import soak


def test_a_straight_line_gives_its_slope_and_a_zero_width_interval():
    t = np.arange(0, 300, 5.0)  # 5 minutes, one sample every 5 s
    s = soak.slope_per_minute(t, 100.0 + 2.0 * t / 60)
    assert s["slope"] == pytest.approx(2.0) and s["ci_low"] == pytest.approx(2.0) == s["ci_high"]
    assert s["samples"] == 60 and s["block"] == 8 and s["minutes"] == pytest.approx(295 / 60)
    assert soak.memory_verdict(s, tolerance=1.0) == "growing"
    assert soak.memory_verdict(s, tolerance=2.5) == "flat"


def test_flat_noisy_memory_is_flat_and_the_interval_is_seeded():
    rng = np.random.default_rng(7)
    t = np.arange(0, 300, 5.0)
    y = 500.0 + rng.normal(0, 0.5, t.size)  # +-0.5 MiB of noise, no trend
    s = soak.slope_per_minute(t, y)
    assert s["ci_low"] <= s["slope"] <= s["ci_high"] and s["ci_low"] < 0 < s["ci_high"]
    assert s["ci_high"] < 1.0 and soak.memory_verdict(s, 1.0) == "flat"
    assert soak.slope_per_minute(t, y) == s  # same seed, same interval
    # a slow leak of 3 MiB/min under the same noise is caught
    assert soak.memory_verdict(soak.slope_per_minute(t, y + 3.0 * t / 60), 1.0) == "growing"


def test_autocorrelated_noise_widens_the_interval():
    """Memory that wanders in long steps (allocator arenas) must not look certain: the block bootstrap gives a
    wider interval than resampling single samples would."""
    rng = np.random.default_rng(3)
    t = np.arange(0, 300, 5.0)
    y = 300.0 + np.repeat(rng.normal(0, 2.0, 6), 10)  # six 50-second plateaus
    wide = soak.slope_per_minute(t, y)
    narrow = soak.slope_per_minute(t, y, block=1)
    assert (wide["ci_high"] - wide["ci_low"]) > 1.5 * (narrow["ci_high"] - narrow["ci_low"])


def test_too_few_samples_is_inconclusive():
    s = soak.slope_per_minute([0.0, 5.0], [1.0, 2.0])
    assert np.isnan(s["slope"]) and soak.memory_verdict(s, 1.0) == "inconclusive"
    wide = {"slope": 0.5, "ci_low": -3.0, "ci_high": 4.0}
    assert soak.memory_verdict(wide, 1.0) == "inconclusive"


def _samples(fn, seconds=600, every=5):
    out = []
    for t in np.arange(0, seconds + 1e-9, every):
        m = {"api": 200.0, "triton": 400.0, "stubs": 150.0}
        m.update(fn(t))
        m["total"] = m["api"] + m["triton"] + m["stubs"]
        out.append({"t_s": float(t), "memory_mib": m})
    return out


def test_verdict_uses_the_second_half_and_counts_errors():
    # warm-up growth in the first half (+50 MiB), flat after: passes
    warm = _samples(lambda t: {"triton": 400.0 + min(t, 300) / 6})
    v = soak.verdict(warm, {"200": 1000}, 600, 1.0)
    assert v["memory"]["triton"]["slope"] == pytest.approx(0.0, abs=1e-9) and v["passed"] and v["memory_flat"]
    assert v["memory"]["triton"]["start_mib"] == 400.0 and v["memory"]["triton"]["end_mib"] == pytest.approx(450.0)
    assert v["memory"]["triton"]["samples"] == 61  # t = 300 ... 600 s
    # the API keeps growing 2 MiB/min: not passed, and it says which process
    leak = soak.verdict(_samples(lambda t: {"api": 200.0 + 2.0 * t / 60}), {"200": 1000}, 600, 1.0)
    assert leak["memory"]["api"]["verdict"] == "growing" and not leak["memory_flat"] and not leak["passed"]
    assert leak["memory"]["api"]["slope"] == pytest.approx(2.0)
    # flat memory but errors: not passed
    err = soak.verdict(warm, {"200": 990, "503": 7, "-1": 3}, 600, 1.0)
    assert err["memory_flat"] and not err["passed"] and err["errors"] == 10
    assert err["errors_by_status"] == {"503": 7, "-1": 3} and err["requests"] == 1000
    assert not soak.verdict(warm, {"200": 5}, 600, 1.0, serve_exit=3)["passed"]


def test_per_minute_table():
    reqs = [(1.0, 0.010, 200), (30.0, 0.020, 200), (59.9, 0.030, 503), (61.0, 0.040, 200), (125.5, 0.050, 200)]
    rows = soak.per_minute(reqs, 120.0)  # the last request finished after the end: it counts in the last minute
    assert [r["requests"] for r in rows] == [3, 2]
    assert rows[0]["statuses"] == {"200": 2, "503": 1} and rows[0]["p50_ms"] == pytest.approx(15.0)
    assert rows[0]["per_s"] == pytest.approx(3 / 60) and rows[1]["p99_ms"] == pytest.approx(49.9)


def test_process_walk_finds_children_by_name_and_reads_their_memory(tmp_path):
    """A child named like a Triton stub is found below this process and its VmRSS read from /proc."""
    exe = tmp_path / "triton_python_backend_stub"
    exe.symlink_to(sys.executable)
    child = subprocess.Popen([str(exe), "-c", "import time; time.sleep(30)"])
    try:
        roles = soak.serving_processes(os.getpid())
        assert roles["api"] == [os.getpid()] and child.pid in roles["stubs"]
        m = soak.memory_sample(os.getpid())
        assert m["stubs"]["processes"] >= 1 and m["stubs"]["VmRSS"] > 1 and m["api"]["VmRSS"] > 10
    finally:
        child.kill()
        child.wait()
    assert soak.proc_status(child.pid) is None


@pytest.mark.triton
def test_short_soak_against_onestep_serve(tiny_artifacts, tmp_path):
    """Half a minute against the real `onestep serve`: samples of all three processes, no errors below the limit,
    and the report files. (Half a minute is too short for the memory verdict to mean anything; the verdict's
    arithmetic is tested above.)"""
    out = tmp_path / "soak"
    res = soak.run(tiny_artifacts["repo"], "tiny", minutes=0.5, limit=4, sample_s=2.0, out=out, log=lambda _: None)
    assert res["statuses"] and set(res["statuses"]) == {"200"}, res["statuses"]
    assert res["verdict"]["errors"] == 0 and res["verdict"]["serve_exited_early"] is None
    assert len(res["samples"]) >= 10
    last = res["samples"][-1]
    assert last["processes"]["api"] == 1 and last["processes"]["triton"] == 1 and last["processes"]["stubs"] >= 1
    assert all(s["memory_mib"][r] > 0 for s in res["samples"] for r in soak.ROLES)
    assert out.with_suffix(".md").read_text().splitlines()[0].startswith("**")
    assert out.with_suffix(".png").stat().st_size > 0
    assert not soak.serving_processes(os.getpid())["triton"]  # nothing left running


def test_a_short_run_gives_no_memory_verdict():
    short = _samples(lambda t: {}, seconds=180, every=2)  # second half: 1.5 minutes
    v = soak.verdict(short, {"200": 10}, 180, 1.0)
    assert all(v["memory"][r]["verdict"] == "inconclusive" for r in soak.ROLES) and not v["passed"]
    assert v["memory"]["api"]["slope"] == 0.0

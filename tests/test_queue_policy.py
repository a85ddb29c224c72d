"""The queue-policy benchmark's statistics and report (the measurement itself needs the real Triton and minutes:
`python -m benchmarks.queue_policy`)."""

import math

import pytest

from benchmarks.queue_policy import VARIANTS, to_markdown, wilson


def test_wilson_interval_known_values():
    lo, hi = wilson(0, 675)  # no slow call in 675: upper end z^2/n / (1 + z^2/n)
    assert lo == 0.0 and hi == pytest.approx(1.96 ** 2 / 675 / (1 + 1.96 ** 2 / 675), rel=1e-12)
    lo, hi = wilson(5, 10)  # symmetric around 1/2
    assert lo + hi == pytest.approx(1.0) and lo == pytest.approx(0.2366, abs=1e-4)
    lo, hi = wilson(57, 675)
    assert lo < 57 / 675 < hi and 0.06 < lo < 0.07 and 0.10 < hi < 0.11
    assert wilson(0, 0) == (0.0, 1.0)
    assert all(0.0 <= x <= 1.0 for k in (0, 1, 9, 10) for x in wilson(k, 10))


def test_variants_cover_no_policy_and_each_part():
    assert VARIANTS["student_no_policy"] == (0, 0)
    assert {v for v in VARIANTS.values()} == {(0, 0), (256, 0), (0, 30_000_000), (256, 30_000_000)}


def test_report_rows():
    rows = [{"model": m, "max_queue_size": s, "queue_timeout_us": t, "calls": 10, "p50_ms": 9.5, "p99_ms": 520.0,
             "max_ms": 530.0, "slow": 1, "slow_fraction": 0.1, "slow_fraction_ci": list(wilson(1, 10)),
             "triton_mean_queue_ms": 50.0} for m, (s, t) in VARIANTS.items()]
    res = {"pattern": {"rounds": 1, "bursts": 1, "burst": 5, "gap_s": 0.03, "stretch": 5}, "slow_ms": 200.0,
           "rows": rows, "command": "python -m benchmarks.queue_policy --out x", "git_revision": "abc",
           "machine": {"cpu_model": "cpu", "cpu_count": 2, "platform": "linux"}, "versions": {"tritonclient": "2"},
           "triton_server": {"version": "2.51.0"}}
    md = to_markdown(res)
    assert md.count("\n| student_") == 4 and "Triton server 2.51.0" in md
    lo, hi = wilson(1, 10)
    assert f"10.0% [{lo * 100:.1f}, {hi * 100:.1f}]" in md and not math.isnan(lo)


def test_round_pattern_sends_new_seeds_in_bursts_then_a_stretch():
    from benchmarks.queue_policy import one_round

    class Recorder:  # records what the pattern asks for; the timing itself needs the real server
        def __init__(self):
            self.calls = []

        def generate(self, model, seeds, labels):
            self.calls.append((model, seeds[0], labels[0] if labels else None))

    r = Recorder()
    lat = one_round(r, "m", 10, bursts=3, burst=5, gap_s=0.0, stretch=7, seed0=100)
    assert len(lat) == 22 and all(t >= 0 for t in lat)
    assert [c[1] for c in r.calls] == list(range(100, 122))  # every call a new seed: no cache hit possible
    assert r.calls[3] == ("m", 103, 3)
    r2 = Recorder()
    one_round(r2, "m", 0, bursts=1, burst=2, gap_s=0.0, stretch=0, seed0=0)
    assert r2.calls == [("m", 0, None), ("m", 1, None)]  # unconditional model: no labels

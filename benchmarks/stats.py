"""The one measuring method behind every latency figure of the benchmarks.

- Warm-up, then each path is timed for at least `min_calls` calls AND at least `window_s` seconds
  (whichever takes longer), split over `rounds` rounds.
- The paths compared are interleaved in rounds (A B C A B C ...), so a slow spell of a shared machine hits
  every path alike; each path's figure for a round is the median (or mean, for stage tables) of its calls in
  that round's block.
- A ratio between two paths is the median of the per-round ratios, with a 95% confidence interval from a
  seeded bootstrap over rounds. Any other figure (a path's latency, a stage) is the median over rounds with
  the same kind of interval.
- Stage tables come from the same calls as the total; `stage_sum_check` says whether the stages add up to
  the total within the total's interval.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_SEED = 0
BOOTSTRAP_SAMPLES = 4000
LEVEL = 0.95
LARGE_SPREAD = 0.10  # rounds disagree when their interquartile range exceeds this fraction of the median
MARK_OVERHEAD_MS = 0.05  # timer reads and the call around the marks: the part of a total no stage can hold


@dataclass(frozen=True)
class Method:
    """How long each path is timed: max(min_calls calls, window_s seconds) over `rounds` rounds."""

    min_calls: int = 200
    window_s: float = 10.0
    rounds: int = 10
    warmup_calls: int = 3
    quick: bool = False

    @classmethod
    def quick_method(cls) -> "Method":
        return cls(min_calls=20, window_s=0.5, rounds=5, warmup_calls=1, quick=True)

    def per_round(self) -> tuple[int, float]:
        """(calls, seconds) that one path's block must reach in every round."""
        return max(1, math.ceil(self.min_calls / self.rounds)), self.window_s / self.rounds

    def describe(self) -> str:
        calls, secs = self.per_round()
        text = (f"{self.warmup_calls} warm-up calls per path, then per path at least {self.min_calls} timed calls and "
                f"at least {self.window_s:g} s, in {self.rounds} interleaved rounds (>= {calls} calls and >= "
                f"{secs:g} s per path per round); figures are medians over rounds, ratios medians of per-round "
                f"ratios, [95% CI] from a seeded bootstrap over rounds ({BOOTSTRAP_SAMPLES} resamples, seed "
                f"{BOOTSTRAP_SEED})")
        if self.quick:
            text += ". QUICK RUN: short windows, figures are indicative only"
        return text

    def as_dict(self) -> dict:
        return {"min_calls": self.min_calls, "window_s": self.window_s, "rounds": self.rounds,
                "warmup_calls": self.warmup_calls, "quick": self.quick,
                "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": BOOTSTRAP_SEED, "level": LEVEL}}


def bootstrap_ci(values: Sequence[float], stat: Callable = np.median, samples: int = BOOTSTRAP_SAMPLES,
                 level: float = LEVEL, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over the given per-round values (seeded, so reproducible)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(samples, v.size))
    boot = stat(v[idx], axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def estimate(values: Sequence[float], seed: int = BOOTSTRAP_SEED) -> dict:
    """Median over rounds with its bootstrap interval and the spread between rounds."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v)) if v.size else float("nan")
    lo, hi = bootstrap_ci(v, seed=seed)
    q1, q3 = (np.quantile(v, [0.25, 0.75]) if v.size else (float("nan"),) * 2)
    spread = float((q3 - q1) / abs(med)) if v.size and med else 0.0
    return {"median": med, "ci_low": lo, "ci_high": hi, "rounds": int(v.size), "spread": spread,
            "large_spread": bool(spread > LARGE_SPREAD)}


def ratio(numerator_rounds: Sequence[float], denominator_rounds: Sequence[float], seed: int = BOOTSTRAP_SEED) -> dict:
    """Median of per-round ratios numerator[r] / denominator[r], with its bootstrap interval over rounds."""
    a = np.asarray(numerator_rounds, dtype=np.float64)
    b = np.asarray(denominator_rounds, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ratio needs the same rounds on both sides ({a.size} vs {b.size})")
    return estimate(a / b, seed=seed)


def fmt_ci(e: dict, spec: str = ".2f", suffix: str = "") -> str:
    """'12.34 [12.01, 12.80]' (with a suffix such as 'x' after each number)."""
    return (f"{format(e['median'], spec)}{suffix} [{format(e['ci_low'], spec)}{suffix}, "
            f"{format(e['ci_high'], spec)}{suffix}]")


def interleaved_order(paths: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, path) in the order they run: every path once per round, in the same order each round."""
    return [(r, p) for r in range(rounds) for p in paths]


@dataclass
class PathResult:
    """Every timed call of one path, grouped by round, with optional per-call stage times."""

    name: str
    calls: list[list[float]] = field(default_factory=list)  # per round: call times (s)
    stages: list[list[dict]] = field(default_factory=list)  # per round: per-call {stage: seconds}
    extra: list[dict] = field(default_factory=list)  # per round: anything the block returns (server statistics)

    def round_medians(self) -> list[float]:
        return [float(np.median(c)) for c in self.calls]

    def round_means(self) -> list[float]:
        return [float(np.mean(c)) for c in self.calls]

    def all_calls(self) -> np.ndarray:
        return np.concatenate([np.asarray(c) for c in self.calls]) if self.calls else np.zeros(0)

    def stage_round_means(self) -> dict[str, list[float]]:
        """stage -> per-round mean over the calls of that round (seconds)."""
        names: list[str] = []
        for rnd in self.stages:
            for call in rnd:
                names += [k for k in call if k not in names]
        return {k: [float(np.mean([c.get(k, 0.0) for c in rnd])) for rnd in self.stages] for k in names}


def run_interleaved(paths: dict[str, Callable[[], dict | None]], method: Method,
                    round_hooks: dict[str, tuple[Callable[[], object], Callable[[object, int], dict]]] | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, PathResult]:
    """Time every path with `method`, interleaved in rounds.

    paths: name -> fn; fn() makes one call and may return {stage: seconds} measured inside that same call
    (anything else it returns is ignored).
    round_hooks: name -> (before(), after(token, n_calls) -> dict), run around each block outside the timed
    calls (e.g. Triton's statistics before/after the block); the dict is stored per round in `extra`.
    """
    round_hooks = round_hooks or {}
    calls_per_round, secs_per_round = method.per_round()
    for name, fn in paths.items():  # warm-up, outside the timed rounds
        for _ in range(method.warmup_calls):
            fn()
    results = {name: PathResult(name) for name in paths}
    for r, name in interleaved_order(list(paths), method.rounds):
        fn = paths[name]
        hook = round_hooks.get(name)
        token = hook[0]() if hook else None
        times, stages = [], []
        t_block = time.perf_counter()
        while len(times) < calls_per_round or time.perf_counter() - t_block < secs_per_round:
            t0 = time.perf_counter()
            st = fn()
            times.append(time.perf_counter() - t0)
            stages.append(st if isinstance(st, dict) else {})
        res = results[name]
        res.calls.append(times)
        res.stages.append(stages)
        res.extra.append(hook[1](token, len(times)) if hook else {})
        if log and r == method.rounds - 1:
            log(f"{name}: {sum(len(c) for c in res.calls)} calls, p50 {np.median(res.all_calls()) * 1e3:.3f} ms")
    return results


def percentiles_ms(times_s: Sequence[float]) -> dict:
    a = np.asarray(times_s, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "runs": int(a.size)}


def stage_table(total_rounds_s: Sequence[float], stage_rounds_s: dict[str, Sequence[float]],
                seed: int = BOOTSTRAP_SEED) -> dict:
    """Per-stage estimates (ms, median over rounds of per-round means) and the sum check against the total.

    Every stage and the total are per-round means over the SAME calls, so the stages should add up to the
    total; `adds_up` is true when the median over rounds of the per-round stage sum lies within the total's
    interval, widened by MARK_OVERHEAD_MS (the cost of the timer reads themselves)."""
    total = np.asarray(total_rounds_s, dtype=np.float64) * 1e3
    stages = {k: np.asarray(v, dtype=np.float64) * 1e3 for k, v in stage_rounds_s.items()}
    for k, v in stages.items():
        if v.shape != total.shape:
            raise ValueError(f"stage {k!r} has {v.size} rounds, the total {total.size}")
    per_round_sum = np.sum(list(stages.values()), axis=0) if stages else np.zeros_like(total)
    tot = estimate(total, seed)
    ssum = estimate(per_round_sum, seed)
    gap = estimate(total - per_round_sum, seed)
    tol = MARK_OVERHEAD_MS
    adds_up = bool(tot["ci_low"] - tol <= ssum["median"] <= tot["ci_high"] + tol)
    return {"total_ms": tot, "stages_ms": {k: estimate(v, seed) for k, v in stages.items()},
            "order": list(stages), "sum_ms": ssum, "unaccounted_ms": gap, "adds_up": adds_up}


def failed_sums(tables: dict[str, dict]) -> list[str]:
    """Names of the stage tables whose stages do not add up to their total."""
    return [name for name, t in tables.items() if not t["adds_up"]]


def spread_notes(estimates: dict[str, dict]) -> list[str]:
    """One line per figure whose rounds disagree by more than LARGE_SPREAD (interquartile range / median)."""
    return [f"{name}: rounds spread {e['spread'] * 100:.0f}% (IQR / median)" for name, e in estimates.items()
            if e.get("large_spread")]

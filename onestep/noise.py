"""Seeds -> noise. The ONE routine shared by training, export checks, serving and batch generation.

Contract: `seeded_noise([s], shape)[0]` depends on (s, shape) only, never on the other seeds of the batch, on
numpy's version or on the machine. The generator is defined here, not borrowed from numpy:

- key(s)      = mix64(s XOR 0x6F6E6573746570)                 (mix64: the SplitMix64 output function)
- word(s, j)  = mix64(key(s) + (j + 1) * 0x9E3779B97F4A7C15)   (mod 2**64; j = 0, 1, 2, ...: a counter)
- pair p of the flattened sample uses words 2p and 2p+1 as uniforms
  u1 = ((w >> 11) + 1) / 2**53 in (0, 1] and u2 = (w >> 11) / 2**53 in [0, 1), and Box-Muller gives
  element 2p = r cos(2 pi u2), element 2p+1 = r sin(2 pi u2), r = sqrt(-2 ln u1), computed in float64 and
  rounded to float32 (row-major order over `shape`; an odd last element drops the sine).

The integer part is exact everywhere; the float part uses only IEEE float64 log/sqrt/cos/sin and one
rounding to float32, so two platforms could differ only where their float64 libm results differ by an ulp
right at a float32 rounding boundary (not observed; `tests/test_noise.py` pins recorded values).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

MAX_SEED = 2**63 - 1
# names the seed -> noise stream; recorded wherever stored data depends on it (pair caches), bumped if it changes
NOISE_STREAM = "splitmix64-boxmuller/1"

_DOMAIN = np.uint64(0x6F6E6573746570)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _words(seeds: np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) uint64: word(s, j) for j < count."""
    with np.errstate(over="ignore"):
        keys = _mix64(seeds.astype(np.uint64) ^ _DOMAIN)
        j = np.arange(1, count + 1, dtype=np.uint64)
        return _mix64(keys[:, None] + j[None, :] * _GAMMA)


def seeded_noise(seeds: Iterable[int], shape: Sequence[int]) -> np.ndarray:
    """Standard-normal float32 noise of shape (len(seeds), *shape), one counter-based stream per seed."""
    seeds = [int(s) for s in seeds]
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed {s} out of range [0, {MAX_SEED}]")
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape, dtype=np.int64))
    if not seeds:
        return np.zeros((0, *shape), dtype=np.float32)
    pairs = (size + 1) // 2
    w = _words(np.asarray(seeds, dtype=np.int64), 2 * pairs).reshape(len(seeds), pairs, 2)
    scale = 2.0 ** -53
    u1 = ((w[..., 0] >> np.uint64(11)).astype(np.float64) + 1.0) * scale
    u2 = (w[..., 1] >> np.uint64(11)).astype(np.float64) * scale
    r = np.sqrt(-2.0 * np.log(u1))
    theta = (2.0 * np.pi) * u2
    out = np.empty((len(seeds), pairs, 2), dtype=np.float64)
    out[..., 0] = r * np.cos(theta)
    out[..., 1] = r * np.sin(theta)
    return out.reshape(len(seeds), 2 * pairs)[:, :size].astype(np.float32).reshape(len(seeds), *shape)


def seeded_noise_steps(seeds: Iterable[int], shape: Sequence[int], steps: int) -> np.ndarray:
    """(len(seeds), steps, *shape): per-step noise of a stochastic sampler, the continuation of each seed's stream
    after its first image. For an even image size, `seeded_noise_steps(s, shape, k)[:, i]` is image i + 1 of
    `seeded_noise(s, (k + 1, *shape))`, whose image 0 is `seeded_noise(s, shape)`: the starting noise and the
    per-step noise of a sample come from its seed alone, whatever the batch."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    shape = tuple(int(d) for d in shape)
    return seeded_noise(seeds, (steps + 1, *shape))[:, 1:]


def parse_seeds(spec: str) -> list[int]:
    """'0-99' -> [0..99], '1,5,7' -> [1, 5, 7], '0-3,10' -> [0, 1, 2, 3, 10]. Ranges are inclusive."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(f"empty seed range {part!r}")
            out.extend(range(lo_i, hi_i + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"no seeds in {spec!r}")
    return out

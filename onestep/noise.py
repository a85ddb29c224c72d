"""Seeds -> noise. The ONE routine shared by training, export checks, serving and batch generation.

Each sample gets its own numpy Generator seeded by its own seed, so the noise (and therefore the image)
for a (seed, label) pair never depends on which other samples were in the batch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

MAX_SEED = 2**63 - 1


def seeded_noise(seeds: Iterable[int], shape: Sequence[int]) -> np.ndarray:
    """Standard-normal float32 noise of shape (len(seeds), *shape), one PCG64 generator per seed."""
    seeds = [int(s) for s in seeds]
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed {s} out of range [0, {MAX_SEED}]")
    shape = tuple(int(d) for d in shape)
    if not seeds:
        return np.zeros((0, *shape), dtype=np.float32)
    return np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds])


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

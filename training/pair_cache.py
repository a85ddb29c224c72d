"""Teacher (noise, image) pairs for offline distillation (Denoising Student, SFERD, Adv-KD).

Shard k holds seeds [k*S, (k+1)*S): z in fp16 (the teacher was run on exactly these fp16-rounded values),
x0 = teacher sample in fp16, labels, seeds. Each shard is written atomically, so a killed build resumes
without duplicates or gaps; `cache.json` pins the teacher hash and sampler and refuses a mismatched resume.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onestep.checkpoint import image_shape
from onestep.noise import NOISE_STREAM, seeded_noise
from onestep.provenance import atomic_write_bytes, atomic_write_json
from onestep.samplers import make_sigmas, SAMPLERS


@dataclass(frozen=True)
class PairCacheConfig:
    """What every offline method (Denoising Student, SFERD, Adv-KD) declares about its teacher pair cache.

    Defaults are Luhman & Luhman 2021 (Sec. 4): deterministic DDIM (eta = 0, i.e. Euler on the probability-flow
    ODE) with 100 steps on the quadratic timestep spacing of Song et al. 2021 (t_i ~ (i/S)^2 * 0.8 T).
    Methods override them where their paper differs."""

    cache_dir: str = "runs/pair-cache"
    n_pairs: int = 10_000
    holdout: int = 500  # the last `holdout` pairs: the held-out set that selects the shipped EMA checkpoint
    teacher_sampler: str = "ddim"  # ddim (== euler) | euler | heun
    teacher_steps: int = 100
    teacher_schedule: str = "ddim-quadratic"  # onestep.samplers.make_sigmas: karras | loglinear | ddim-*
    cache_batch: int = 250


def teacher_sigmas(teacher, schedule: str, steps: int) -> np.ndarray:
    """The sampler's sigma grid (decreasing, ending in 0). DDIM spacings select timesteps of the teacher's own
    discrete training schedule when it has one (a diffusers DDPM teacher); otherwise of the linear-beta DDPM
    schedule (Ho et al. 2020) the papers' teachers used, keeping only levels within the teacher's sigma range."""
    train = getattr(teacher, "train_sigmas", None)
    if train is not None and not isinstance(train, np.ndarray):
        train = train.detach().cpu().double().numpy()
    sig = make_sigmas(schedule, steps, float(teacher.sigma_min), float(teacher.sigma_max), train_sigmas=train)
    if schedule.startswith("ddim-") and train is None:
        keep = sig[:-1][sig[:-1] <= float(teacher.sigma_max) * (1 + 1e-6)]
        if len(keep) == 0:
            raise ValueError(f"schedule {schedule!r} has no level within the teacher's sigma range")
        sig = np.append(keep, 0.0)
    return sig


def build_pair_cache(teacher, teacher_sha: str, out_dir: str | Path, n_pairs: int, sampler: str = "heun",
                     steps: int = 18, shard_size: int = 500, batch: int = 250, seed0: int = 0,
                     progress: bool = True, snapshots: tuple[float, ...] = (), schedule: str = "karras") -> dict:
    """snapshots: sigma levels at which to also record the sampler's state (Adv-KD trajectories)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = image_shape(teacher.spec)
    n_cls = int(getattr(teacher, "num_classes", 0))
    manifest = {"noise_stream": NOISE_STREAM, "teacher_sha256": teacher_sha, "sampler": sampler, "steps": steps, "shape": list(shape),
                "num_classes": n_cls, "shard_size": shard_size, "seed0": seed0, "snapshots": list(snapshots),
                "schedule": schedule, "sigma_min": teacher.sigma_min, "sigma_max": teacher.sigma_max}
    mf = out / "cache.json"
    if mf.exists():
        old = json.loads(mf.read_text())
        old_n = old.pop("n_pairs", None)
        if old != manifest:
            raise ValueError(f"{out} holds pairs of another teacher/sampler; use a new folder")
        n_pairs = max(n_pairs, old_n or 0)
    atomic_write_json(mf, {**manifest, "n_pairs": n_pairs})
    sigmas = teacher_sigmas(teacher, schedule, steps)
    device = _device_of(teacher)
    n_shards = (n_pairs + shard_size - 1) // shard_size
    todo = [k for k in range(n_shards) if not (out / f"pairs-{k:05d}.npz").exists()]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_shards * shard_size, initial=(n_shards - len(todo)) * shard_size, desc="teacher pairs",
                   unit="pair")
    for k in todo:
        seeds = np.arange(seed0 + k * shard_size, seed0 + min((k + 1) * shard_size, n_pairs))
        zs, xs, snaps = [], [], []
        for i in range(0, len(seeds), batch):
            s = seeds[i:i + batch]
            z16 = seeded_noise(s, shape).astype(np.float16)
            labels = torch.from_numpy(s % n_cls).to(device) if n_cls else None
            z = torch.from_numpy(z16.astype(np.float32)).to(device)
            with torch.no_grad():
                if snapshots:
                    x, traj = _sample_with_snapshots(teacher, z, sigmas, labels, sampler, snapshots)
                    snaps.append(np.stack([t.cpu().numpy().astype(np.float16) for t in traj], 1))
                else:
                    x = SAMPLERS[sampler](teacher, z, sigmas, labels)
            zs.append(z16)
            xs.append(x.clamp(-1, 1).cpu().numpy().astype(np.float16))
            if bar:
                bar.update(len(s))
        arrays = {"z": np.concatenate(zs), "x0": np.concatenate(xs), "seeds": seeds.astype(np.int64)}
        if n_cls:
            arrays["labels"] = (seeds % n_cls).astype(np.int64)
        if snapshots:
            arrays["snapshots"] = np.concatenate(snaps)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(out / f"pairs-{k:05d}.npz", buf.getvalue())
    if bar:
        bar.close()
    return {"n_pairs": n_pairs, "shards": n_shards, "made": len(todo)}


def _device_of(teacher) -> torch.device:
    """Where the teacher's weights live: the noise goes there, the pairs come back to host memory."""
    p = next(iter(teacher.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _sample_with_snapshots(teacher, z, sigmas, labels, sampler, snapshots):
    """Run the sampler step by step, recording x0_hat-free states x at the first grid sigma <= each snapshot."""
    sig = [float(s) for s in sigmas]
    targets = sorted(snapshots, reverse=True)
    x = z * sig[0]
    traj = []
    ti = 0
    for i in range(len(sig) - 1):
        while ti < len(targets) and sig[i] <= targets[ti]:
            traj.append(x.clone() / (1 + sig[i] ** 2) ** 0.5)  # VP-scaled state: unit variance
            ti += 1
        x = SAMPLERS[sampler](teacher, x / sig[i], np.array([sig[i], sig[i + 1]]), labels)
    while ti < len(targets):
        traj.append(x.clone())
        ti += 1
    return x, traj


def load_pair_cache(out_dir: str | Path, holdout: int = 0):
    """All shards concatenated -> (train dict, holdout dict) of numpy arrays (holdout = the last `holdout` pairs)."""
    out = Path(out_dir)
    files = sorted(out.glob("pairs-*.npz"))
    if not files:
        raise FileNotFoundError(f"no pair shards in {out}")
    parts: dict[str, list] = {}
    for f in files:
        with np.load(f) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    data = {k: np.concatenate(v) for k, v in parts.items()}
    seeds = data["seeds"]
    if len(np.unique(seeds)) != len(seeds):
        raise ValueError(f"{out}: duplicate seeds in the cache")
    if holdout:
        return ({k: v[:-holdout] for k, v in data.items()}, {k: v[-holdout:] for k, v in data.items()})
    return data, None

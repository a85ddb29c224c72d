"""`onestep generate`: offline batch generation from a seed range into sharded .npz files and/or PNG folders.

- Shard k holds seeds[k*S:(k+1)*S]; every shard is written to a temporary name and renamed when complete, so
  a killed run (even kill -9) leaves only whole shards and a rerun produces exactly the files of an
  uninterrupted run: completed shards are skipped, the rest are made.
- `job.json` pins the job (seeds, labels, model hash, shard size, formats); whichever rank comes first
  creates it atomically, and every rank (and every rerun) compares its own settings with it and refuses a
  mismatch instead of mixing outputs.
- Ranks: under torchrun (RANK/WORLD_SIZE in the environment) or with --rank/--world-size, shard k goes to
  rank k mod world_size; no coordination is needed. Temporary files carry their shard's name, and a rank only
  removes leftovers of ITS shards, so a starting rank never deletes a live rank's work in progress.
- Backends: in-process onnxruntime (--onnx) or a Triton server (--triton URL --model NAME).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np



def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def labels_for(seeds: Sequence[int], num_classes: int, label: int | None) -> list[int] | None:
    if not num_classes:
        if label is not None:
            raise ValueError("--label given, but the model is unconditional (it takes no class labels)")
        return None
    if label is not None:
        if not 0 <= label < num_classes:
            raise ValueError(f"label must lie in [0, {num_classes - 1}]")
        return [label] * len(seeds)
    return [s % num_classes for s in seeds]


def run_job(out_dir: str | Path, seeds: Sequence[int], generate: Callable[[list[int], list[int] | None], np.ndarray],
            num_classes: int, job: dict, label: int | None = None, shard_size: int = 1000, batch: int = 64,
            formats: Sequence[str] = ("npz",), rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds to generate")
    labels_for(seeds[:1], num_classes, label)  # a bad --label fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = {**job, "num_seeds": len(seeds), "first_seed": seeds[0], "last_seed": seeds[-1],
           "seeds_sha": _seeds_digest(seeds), "label": label, "shard_size": shard_size, "formats": sorted(formats)}
    check_job(out, job)
    n_shards = (len(seeds) + shard_size - 1) // shard_size
    mine = [k for k in range(n_shards) if k % world_size == rank]
    removed = clean_partial(out, mine)
    todo = [k for k in mine if not _shard_done(out, k, formats)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(min(shard_size, len(seeds) - k * shard_size) for k in mine), desc="generate",
                   unit="img", initial=sum(min(shard_size, len(seeds) - k * shard_size) for k in mine if k not in todo))
    for k in todo:
        s = seeds[k * shard_size:(k + 1) * shard_size]
        labs = labels_for(s, num_classes, label)
        parts = []
        for i in range(0, len(s), batch):
            parts.append(generate(s[i:i + batch], None if labs is None else labs[i:i + batch]))
            if bar:
                bar.update(len(s[i:i + batch]))
        images = np.concatenate(parts)
        _write_shard(out, k, images, np.asarray(s, dtype=np.int64),
                     None if labs is None else np.asarray(labs, dtype=np.int64), formats)
    if bar:
        bar.close()
    return {"shards": n_shards, "mine": len(mine), "made": len(todo), "skipped": len(mine) - len(todo), "out": str(out),
            "removed_partial": removed}


def check_job(out: Path, job: dict) -> None:
    """Create `job.json` if no rank has yet (atomically: a complete temporary file hard-linked into place,
    which fails when the name exists), then compare this rank's job with the one on disk."""
    jf = out / "job.json"
    if not jf.exists():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-job-", suffix=".json", dir=out)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(job, f, indent=2, sort_keys=True, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            with contextlib.suppress(FileExistsError):  # another rank came first: compare with its job below
                os.link(tmp, jf)
        finally:
            os.unlink(tmp)
    old = json.loads(jf.read_text())
    job = json.loads(json.dumps(job, default=str))
    if old != job:
        diff = {k: (old.get(k), job.get(k)) for k in set(old) | set(job) if old.get(k) != job.get(k)}
        raise ValueError(f"{out} holds another job (differs in {diff}); use a new folder or the same settings")


def _seeds_digest(seeds: Sequence[int]) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()[:16]


def _shard_done(out: Path, k: int, formats) -> bool:
    return all((out / (shard_name(k) + ".npz")).exists() if f == "npz" else (out / shard_name(k)).is_dir()
               for f in formats)


def _write_shard(out: Path, k: int, images: np.ndarray, seeds: np.ndarray, labels, formats) -> None:
    from onestep.images import encode_image

    if "npz" in formats and not (out / (shard_name(k) + ".npz")).exists():
        buf = io.BytesIO()
        arrays = {"images": images, "seeds": seeds}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(buf, **arrays)  # uncompressed: byte-identical for identical content
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{shard_name(k)}-", suffix=".npz", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, out / (shard_name(k) + ".npz"))
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    if "png" in formats and not (out / shard_name(k)).is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{shard_name(k)}-", dir=out))
        try:
            for img, s in zip(images, seeds):
                (tmp / f"{int(s):010d}.png").write_bytes(encode_image(img.transpose(1, 2, 0), "png"))
            os.replace(tmp, out / shard_name(k))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def clean_partial(out_dir: str | Path, shards: Sequence[int]) -> int:
    """Remove temporary files a killed run left for `shards` (this rank's shards only: another live rank's
    temporary files belong to other shards and stay). They are never mistaken for shards anyway."""
    n = 0
    for k in shards:
        for p in Path(out_dir).glob(f".tmp-{shard_name(k)}-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n

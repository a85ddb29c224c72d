import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving.engine import ImageEngine
from serving.generate import run_job

ROOT = Path(__file__).resolve().parent.parent


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cmd(tiny_artifacts, out, seeds="0-59", extra=()):
    return [sys.executable, "-m", "onestep.cli", "generate", "--seeds", seeds, "--out", str(out), "--onnx",
            str(tiny_artifacts["student_onnx"]), "--shard-size", "10", "--batch", "5", "--format", "npz,png",
            "--quiet", "--threads", "1", *extra]


def test_shards_hold_the_right_images(tiny_artifacts, tmp_path):
    eng = ImageEngine(tiny_artifacts["student_onnx"])
    res = run_job(tmp_path, list(range(25)), eng.generate, eng.num_classes, {"k": 1}, shard_size=10, batch=4,
                  formats=("npz", "png"), progress=False)
    assert res == {"shards": 3, "mine": 3, "made": 3, "skipped": 0, "out": str(tmp_path), "removed_partial": 0}
    z = np.load(tmp_path / "shard-000002.npz")
    assert z["seeds"].tolist() == list(range(20, 25)) and z["labels"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(z["images"], eng.generate(range(20, 25), [0, 1, 2, 3, 4]))
    assert sorted(p.name for p in (tmp_path / "shard-000000").iterdir())[:2] == ["0000000000.png", "0000000001.png"]
    again = run_job(tmp_path, list(range(25)), eng.generate, eng.num_classes, {"k": 1}, shard_size=10, batch=4,
                    formats=("npz", "png"), progress=False)
    assert again["made"] == 0 and again["skipped"] == 3
    with pytest.raises(ValueError, match="another job"):
        run_job(tmp_path, list(range(30)), eng.generate, eng.num_classes, {"k": 1}, shard_size=10,
                formats=("npz", "png"), progress=False)


def test_ranks_split_the_work_without_overlap(tiny_artifacts, tmp_path):
    eng = ImageEngine(tiny_artifacts["student_onnx"])
    kw = dict(generate=eng.generate, num_classes=eng.num_classes, job={}, shard_size=10, progress=False)
    run_job(tmp_path / "one", list(range(40)), **kw)
    for r in range(3):
        run_job(tmp_path / "three", list(range(40)), rank=r, world_size=3, **kw)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "three")


def test_kill_9_then_rerun_gives_identical_files(tiny_artifacts, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    subprocess.run(_cmd(tiny_artifacts, ref), env=env, check=True, timeout=300, cwd=ROOT)
    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    for attempt in range(3):  # kill at random points, possibly several times
        p = subprocess.Popen(_cmd(tiny_artifacts, out), env=env, cwd=ROOT)
        time.sleep(float(rng.uniform(1.5, 4.0)))
        p.send_signal(signal.SIGKILL)
        p.wait()
    subprocess.run(_cmd(tiny_artifacts, out), env=env, check=True, timeout=300, cwd=ROOT)
    assert _digest(ref) == _digest(out)
    seeds = np.concatenate([np.load(f)["seeds"] for f in sorted(out.glob("shard-*.npz"))])
    assert seeds.tolist() == list(range(60))  # no missing or duplicate seeds


def test_teacher_onnx_generation(tiny_artifacts, tmp_path):
    eng = ImageEngine(tiny_artifacts["teacher_onnx"], sampler="heun", steps=3)
    assert eng.mode == "teacher" and eng.nfe == 5
    imgs = eng.generate([1, 2], [1, 2])
    assert imgs.shape == (2, 1, 32, 32) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(eng.generate([2], [2])[0], imgs[1])
    with pytest.raises(ValueError, match="labels must lie"):
        eng.generate([1], [11])


def test_every_rank_checks_the_job_whoever_starts_first(tiny_artifacts, tmp_path):
    """Rank 1 starts first and writes job.json; rank 0 started with another --label must be refused (and so
    must any rank that disagrees with the job on disk)."""
    eng = ImageEngine(tiny_artifacts["student_onnx"])
    kw = dict(generate=eng.generate, num_classes=eng.num_classes, job={"m": 1}, shard_size=10, progress=False,
              world_size=2)
    run_job(tmp_path, list(range(40)), rank=1, **kw)
    assert (tmp_path / "job.json").exists()
    with pytest.raises(ValueError, match="another job"):
        run_job(tmp_path, list(range(40)), rank=0, label=3, **kw)
    with pytest.raises(ValueError, match="another job"):
        run_job(tmp_path, list(range(40)), rank=1, label=3, **kw)
    assert not list(tmp_path.glob("shard-000000*"))  # the refused rank wrote nothing
    run_job(tmp_path, list(range(40)), rank=0, **kw)
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == [f"shard-00000{k}.npz" for k in range(4)]


def test_a_starting_rank_keeps_other_ranks_temporary_files(tiny_artifacts, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    tmp_path.mkdir(exist_ok=True)
    theirs = tmp_path / ".tmp-shard-000001-abc.npz"  # rank 1 of 2 is writing shard 1 right now
    theirs.write_bytes(b"in progress")
    their_dir = tmp_path / ".tmp-shard-000003-xyz"
    their_dir.mkdir()
    mine = tmp_path / ".tmp-shard-000002-old.npz"  # left over by a killed rank 0
    mine.write_bytes(b"stale")
    out = subprocess.run(_cmd(tiny_artifacts, tmp_path, seeds="0-39", extra=("--rank", "0", "--world-size", "2")),
                         env=env, check=True, timeout=300, cwd=ROOT, capture_output=True, text=True).stdout
    assert theirs.exists() and their_dir.is_dir()
    assert not mine.exists()
    import json

    assert json.loads(out.strip().splitlines()[-1])["removed_partial"] == 1

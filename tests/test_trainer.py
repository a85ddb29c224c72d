import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from onestep.config import override
from training.presets import get_preset
from training.run import build_method, train
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


def _rc(steps, **kw):
    rc = get_preset("tiny-teacher")
    sets = [f"train.steps={steps}", "train.sample_every=0", "train.ckpt_every=0"] + \
        [f"{k}={json.dumps(v)}" for k, v in kw.items()]
    return override(rc, sets)


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


@needs_fmnist
def test_teacher_loss_falls(tmp_path):
    train(_rc(30, **{"train.log_every": 5}), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["denoiser/loss"] for r in rows if "denoiser/loss" in r]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (tmp_path / "model.json").exists() and (tmp_path / "log.csv").exists()


@needs_fmnist
def test_resume_continues_the_same_run(tmp_path):
    train(_rc(6), tmp_path / "straight", progress=False)
    train(_rc(3), tmp_path / "split", progress=False)  # "killed" after 3 iterations (a checkpoint is written)
    res = train(_rc(6), tmp_path / "split", progress=False)  # resumes from iteration 3
    assert res["it"] == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    # the resume recorded what its config changed (the run length), and config.json still holds the start's
    (rec,) = [json.loads(line) for line in (tmp_path / "split" / "resumes.jsonl").read_text().splitlines()]
    assert rec["iteration"] == 3 and rec["changed"] == {"train.steps": [3, 6], "run_config.train.steps": [3, 6]}
    assert json.loads((tmp_path / "split" / "config.json").read_text())["train"]["steps"] == 3


def test_config_diff_is_flat_and_ignores_tuple_vs_list():
    from training.trainer import config_diff

    old = {"a": {"b": (0.9, 0.98), "c": "constant"}, "d": 1}
    new = {"a": {"b": [0.9, 0.98], "c": "cosine"}, "e": 2}
    assert config_diff(old, new) == {"a.c": ["constant", "cosine"], "d": [1, None], "e": [None, 2]}
    assert config_diff(old, old) == {}


@needs_fmnist
def test_nan_guard_skips_and_stops(tmp_path):
    rc = _rc(50, **{"train.max_nan_skips": 3})
    method = build_method(rc)
    orig = method.step
    method.step = lambda batch, it, phase: {"loss": orig(batch, it, phase)["loss"] * float("nan")}
    trainer = Trainer(method, rc.train, tmp_path, progress=False)
    before = {k: v.clone() for k, v in method.trainable["denoiser"].state_dict().items()}
    from training.trainer import NonFiniteError

    with pytest.raises(NonFiniteError, match="consecutive non-finite"):
        trainer.fit()
    after = method.trainable["denoiser"].state_dict()
    for k in before:  # no poisoned update was applied
        torch.testing.assert_close(before[k], after[k])


@needs_fmnist
def test_sample_grid_written(tmp_path):
    rc = override(get_preset("tiny-teacher"), ["train.steps=2", "train.sample_every=2", "train.ckpt_every=0"])
    train(rc, tmp_path, progress=False)
    assert (tmp_path / "samples" / "grid-00000002.png").stat().st_size > 100


@needs_fmnist
def test_data_parallel_two_processes_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "onestep.cli", "train", "--preset", "tiny-teacher", "--run-dir", str(tmp_path),
           "--set", "train.steps=4", "--set", "train.sample_every=0", "--set", "train.ckpt_every=2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["iteration"] == 4


@needs_fmnist
def test_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    """kill -9 at a random point, rerun the same command: the run continues from its last checkpoint and ends
    with exactly the weights of an uninterrupted run."""
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def cmd(run_dir):
        return [sys.executable, "-m", "onestep.cli", "train", "--preset", "tiny-teacher", "--run-dir", str(run_dir),
                "--set", "train.steps=40", "--set", "train.ckpt_every=5", "--set", "train.sample_every=0"]

    subprocess.run(cmd(tmp_path / "straight"), env=env, check=True, timeout=300, capture_output=True)
    p = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "killed" / "checkpoints").glob("state-*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(float(np.random.default_rng().uniform(0.0, 1.0)))
    p.send_signal(signal.SIGKILL)
    p.wait()
    out = subprocess.run(cmd(tmp_path / "killed"), env=env, check=True, timeout=300, capture_output=True, text=True)
    assert "resumed from" in out.stdout
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_power_function_ema_matches_edm2_and_differs_from_the_start():
    from training.trainer import EMA, power_ema_gamma

    # EDM2 (Karras et al. 2024) pairs sigma_rel 0.05 with gamma 16.97 and 0.10 with gamma 6.94
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError):
        power_ema_gamma(0.3)
    net = torch.nn.Linear(1, 1, bias=False)
    short, long_, classic = EMA(net, sigma_rel=0.05), EMA(net, sigma_rel=0.10), EMA(net, 0.999)
    assert short.beta(0) == 0.0  # the first update copies the weights
    # at iteration 100 the classic warm-up binds (101/110) for any decay; the power EMAs already differ
    assert classic.beta(100) == pytest.approx(101 / 110)
    assert short.beta(100) == pytest.approx((1 - 1 / 101) ** 17.97, rel=1e-3)
    assert short.beta(100) < long_.beta(100)
    with torch.no_grad():
        for it in range(50):
            net.weight.fill_(float(it))
            for e in (short, long_):
                e.update(net, it)
    # a longer average lags further behind a weight that rises linearly
    assert long_.net.weight.item() < short.net.weight.item() < 49


def test_extra_power_emas_are_exported(tmp_path):
    rc = _rc(4, **{"train.extra_ema_sigma_rels": [0.05, 0.1], "train.ckpt_every": 4})
    train(rc, tmp_path, progress=False)
    assert (tmp_path / "model-emastd0.05.safetensors").exists()
    assert (tmp_path / "model-emastd0.1.safetensors").exists()


def test_learning_rate_warmup_then_cosine_to_the_floor():
    from onestep.config import OptimConfig, learning_rate

    oc = OptimConfig(lr=4e-4, warmup_steps=100, decay="cosine", min_lr_ratio=0.1)
    # golden values: warm-up (it+1)/100; then lr * (0.1 + 0.9 * (1 + cos(pi * (it - 100) / 900)) / 2)
    assert learning_rate(oc, 0, 1000) == pytest.approx(4e-6)
    assert learning_rate(oc, 99, 1000) == pytest.approx(4e-4)
    assert learning_rate(oc, 550, 1000) == pytest.approx(4e-4 * 0.55)
    assert learning_rate(oc, 325, 1000) == pytest.approx(4e-4 * (0.1 + 0.9 * (1 + np.cos(np.pi / 4)) / 2))
    assert learning_rate(oc, 1000, 1000) == pytest.approx(4e-5)
    assert learning_rate(oc, 5000, 1000) == pytest.approx(4e-5)  # past the end: the floor
    const = OptimConfig(lr=1e-3, warmup_steps=10)
    assert learning_rate(const, 4, 1000) == pytest.approx(5e-4)
    assert learning_rate(const, 900, 1000) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown learning-rate decay"):
        learning_rate(OptimConfig(decay="linear"), 0, 10)


@needs_fmnist
def test_trainer_logs_the_cosine_learning_rate(tmp_path):
    rc = _rc(8, **{"train.log_every": 1, "method_cfg.optim.decay": "cosine", "method_cfg.optim.warmup_steps": 0,
                   "method_cfg.optim.lr": 1e-3})
    train(rc, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [r["denoiser/lr"] for r in rows if "denoiser/lr" in r]
    # the rate each iteration used: 1e-3 * (1 + cos(pi * it / 8)) / 2, reaching 0 where the run ends
    assert lrs == pytest.approx([1e-3 * (1 + np.cos(np.pi * it / 8)) / 2 for it in range(8)], rel=1e-9)


@needs_fmnist
def test_snapshots_every_n_iterations_in_the_export_dtype(tmp_path):
    from safetensors.torch import load_file

    from onestep.checkpoint import load_model

    rc = _rc(4, **{"train.snapshot_every": 2, "train.export_dtype": "fp16"})
    train(rc, tmp_path, progress=False)
    snaps = sorted(p.name for p in (tmp_path / "snapshots").glob("*.safetensors"))
    assert snaps == ["model-00000002.safetensors", "model-00000004.safetensors"]
    final = load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in final.values() if v.is_floating_point()} == {torch.float16}
    last = load_file(str(tmp_path / "snapshots" / snaps[-1]))
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last snapshot is the final product
    _, meta = load_model(tmp_path / "snapshots" / snaps[0])
    assert meta["iteration"] == 2


def test_unknown_export_dtype_is_refused(tmp_path):
    rc = _rc(1, **{"train.export_dtype": "int8"})
    with pytest.raises(ValueError, match="export_dtype"):
        Trainer(build_method(rc), rc.train, tmp_path, progress=False)


@needs_fmnist
def test_config_records_the_device_the_run_trains_on(tmp_path):
    train(_rc(1), tmp_path, progress=False, device="cpu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["device"]["type"] == "cpu" and cfg["device"]["world_size"] == 1 and cfg["device"]["threads"] >= 1


def test_log_csv_widens_its_header_when_a_column_appears(tmp_path):
    """A fake-score warm-up logs fake/* columns only; when the generator phase starts, the CSV is written again
    under the union of the columns, so every row lines up with its header."""
    import csv
    from types import SimpleNamespace

    from training.trainer import Trainer

    fake = SimpleNamespace(run_dir=tmp_path)
    Trainer._log(fake, {"it": 1, "fake/loss": 0.5})
    Trainer._log(fake, {"it": 2, "fake/loss": 0.4})
    Trainer._log(fake, {"it": 3, "fake/loss": 0.3, "gen/loss": -1.0})
    Trainer._log(fake, {"it": 4, "fake/loss": 0.2, "gen/loss": -2.0})
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["it", "fake/loss", "gen/loss"]
    assert [r["gen/loss"] for r in rows] == ["", "", "-1.0", "-2.0"]
    assert [r["it"] for r in rows] == ["1", "2", "3", "4"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4


@needs_fmnist
def test_log_rows_time_their_own_window(tmp_path, monkeypatch):
    """sec_per_it covers the iterations since the previous row (a fake clock: 1 s per iteration for the first 4,
    then 3 s), elapsed_s the time since the process started; summed over the rows, sec_per_it x iterations is the
    training time."""
    import training.trainer as tr

    clock = {"t": 1000.0}
    monkeypatch.setattr(tr.time, "time", lambda: clock["t"])
    step = Trainer.train_step

    def timed_step(self):
        clock["t"] += 1.0 if self.it < 4 else 3.0
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    train(_rc(8, **{"train.log_every": 2}), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sec_per_it" in r]
    assert [r["it"] for r in rows] == [2, 4, 6, 8]
    assert [r["sec_per_it"] for r in rows] == [1.0, 1.0, 3.0, 3.0]
    assert [r["elapsed_s"] for r in rows] == [2.0, 4.0, 10.0, 16.0]

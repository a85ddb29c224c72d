import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep.config import override
from training.presets import get_preset
from training.run import build_method, train


def _rc(preset, tiny_artifacts, tmp_path, *sets):
    rc = override(get_preset(preset), [f"teacher={json.dumps(str(tiny_artifacts['teacher_ckpt']))}", *sets])
    if hasattr(rc.method_cfg, "cache_dir"):  # offline methods: a pair cache per test
        rc = override(rc, [f"method_cfg.cache_dir={json.dumps(str(tmp_path / ('pairs-' + preset)))}"])
    return rc


def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_denoising_student_loss_falls_and_best_checkpoint(tiny_artifacts, tmp_path):
    res = train(_rc("tiny-denoising-student", tiny_artifacts, tmp_path, "train.steps=30"), tmp_path / "run",
                progress=False)
    losses = [r["generator/loss"] for r in _log(tmp_path / "run") if "generator/loss" in r]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    vals = [r["val/loss"] for r in _log(tmp_path / "run") if "val/loss" in r]
    assert vals and "best_model" in res
    meta = json.loads((tmp_path / "run" / "model-best.json").read_text())
    assert meta["method"] == "denoising-student" and meta["model"]["sigma_g"] == 80.0


def test_pair_cache_resumes_without_duplicates_or_gaps(tiny_artifacts, tmp_path):
    from onestep.checkpoint import load_model
    from training.pair_cache import build_pair_cache, load_pair_cache

    teacher, meta = load_model(tiny_artifacts["teacher_ckpt"])
    build_pair_cache(teacher, meta["sha256"], tmp_path / "a", 40, "heun", 2, shard_size=16, batch=8, progress=False)
    full, _ = load_pair_cache(tmp_path / "a")
    (tmp_path / "a" / "pairs-00001.npz").unlink()  # as if killed before shard 1 was renamed into place
    res = build_pair_cache(teacher, meta["sha256"], tmp_path / "a", 40, "heun", 2, shard_size=16, batch=8,
                           progress=False)
    assert res["made"] == 1
    again, _ = load_pair_cache(tmp_path / "a")
    assert again["seeds"].tolist() == list(range(40))
    for k in full:
        np.testing.assert_array_equal(full[k], again[k])
    # the target is the teacher run on exactly the stored (fp16) noise
    from onestep.samplers import karras_sigmas, sample_heun

    z = torch.from_numpy(full["z"][:2].astype(np.float32))
    x = sample_heun(teacher, z, karras_sigmas(2), torch.tensor([0, 1])).clamp(-1, 1)
    np.testing.assert_allclose(x.numpy(), full["x0"][:2].astype(np.float32), atol=2e-3)
    with pytest.raises(ValueError, match="another teacher"):
        build_pair_cache(teacher, "other-sha", tmp_path / "a", 40, "heun", 2, shard_size=16, progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("snapshots", [(), (10.0, 0.5)])
def test_pair_cache_on_a_cuda_teacher_matches_the_cpu_one(tiny_artifacts, tmp_path, snapshots):
    """The teacher runs where its weights are; the noise goes there and the pairs come back to host memory."""
    from onestep.checkpoint import load_model
    from training.pair_cache import build_pair_cache, load_pair_cache

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    teacher, meta = load_model(tiny_artifacts["teacher_ckpt"])
    for name in ("cpu", "cuda"):
        build_pair_cache(teacher.to(name), meta["sha256"], tmp_path / name, 24, "euler", 4, shard_size=16, batch=8,
                         snapshots=snapshots, progress=False)
    cpu, _ = load_pair_cache(tmp_path / "cpu")
    gpu, _ = load_pair_cache(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    np.testing.assert_array_equal(cpu["z"], gpu["z"])
    np.testing.assert_allclose(cpu["x0"].astype(np.float32), gpu["x0"].astype(np.float32), atol=1e-2)


@pytest.mark.parametrize("preset", ["tiny-sid", "tiny-sida"])
def test_sid_losses_finite_fake_score_learns_teacher_frozen(tiny_artifacts, tmp_path, preset):
    if preset == "tiny-sida":
        pytest.importorskip("onestep.data")
        from conftest import has_fashion_mnist

        if not has_fashion_mnist():
            pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    rc = _rc(preset, tiny_artifacts, tmp_path, "train.steps=24", "train.log_every=4")
    method = build_method(rc)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    from training.trainer import Trainer

    trainer = Trainer(method, rc.train, tmp_path / "run", run_config=rc.to_dict(), progress=False)
    trainer.fit()
    rows = _log(tmp_path / "run")
    dsm = [r["fake/dsm"] for r in rows if "fake/dsm" in r]
    sid = [r["generator/sid"] for r in rows if "generator/sid" in r]
    assert sid and np.all(np.isfinite(sid)) and np.all(np.isfinite(dsm))
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], atol=0, rtol=0)
    assert all(p.grad is None for p in method.teacher.parameters())
    gen0 = build_method(rc).trainable["generator"].state_dict()
    moved = [k for k, v in method.trainable["generator"].state_dict().items() if not torch.equal(v, gen0[k])]
    assert moved, "the generator never changed"
    if preset == "tiny-sida":
        assert any("fake/d_loss" in r for r in rows) and any("generator/gan" in r for r in rows)


def test_sid_fake_score_loss_falls_against_a_fixed_generator(tiny_artifacts, tmp_path):
    rc = _rc("tiny-sid", tiny_artifacts, tmp_path, "train.steps=40", "train.log_every=5", "train.batch_size=8",
             "method_cfg.fake_warmup=1000", "method_cfg.optim_fake.lr=0.002")
    train(rc, tmp_path / "run", progress=False)
    dsm = [r["fake/dsm"] for r in _log(tmp_path / "run") if "fake/dsm" in r]
    assert np.mean(dsm[-3:]) < 0.9 * np.mean(dsm[:2])


def test_sid_resume_continues_the_same_run(tiny_artifacts, tmp_path):
    rc = _rc("tiny-sid", tiny_artifacts, tmp_path, "train.steps=6", "train.ckpt_every=0")
    train(rc, tmp_path / "straight", progress=False)
    train(override(rc, ["train.steps=3"]), tmp_path / "split", progress=False)
    train(rc, tmp_path / "split", progress=False)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_sid_generator_loss_matches_the_formula(tiny_artifacts, tmp_path):
    """Recompute SiD's generator loss by hand from the same random draws (z, t, noise)."""
    from training.methods.common import karras_sigma_at

    m = build_method(_rc("tiny-sid", tiny_artifacts, tmp_path))
    labels = torch.tensor([1, 2])
    torch.manual_seed(3)
    out = m.step({"n": 2, "labels": labels}, it=100, phase="generator")
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    torch.manual_seed(3)
    with torch.no_grad():
        z = torch.randn(2, 1, 32, 32)
        x_g = m.trainable["generator"](z, labels)
        sigma = karras_sigma_at(torch.rand(2) * 0.8, 0.002, 80.0)
        x_t = x_g + torch.randn_like(x_g) * sigma.reshape(-1, 1, 1, 1)
        f_phi, f_psi = m.teacher(x_t, sigma, labels), m.trainable["fake"](x_t, sigma, labels)
        scale = (x_g - f_phi).abs().mean((1, 2, 3), keepdim=True)
        ref = ((f_phi - f_psi) * ((f_phi - x_g) - 1.2 * (f_phi - f_psi)) / scale).sum((1, 2, 3)).mean()
    torch.testing.assert_close(out["loss"].detach(), ref, rtol=1e-4, atol=1e-5)
    # at initialisation f_psi == f_phi (both copies of the teacher): the loss is exactly 0
    assert abs(float(ref)) < 1e-6


def test_students_export_as_one_graph(tiny_artifacts, tmp_path):
    """Students of every model kind leave PyTorch as (z, labels) -> image ONNX graphs within tolerance: the
    teacher-initialised generator, SFERD's generator + gradient predictor + unrolled latent sampler, and Adv-KD's
    staged generator."""
    from exporters.onnx_export import export_onnx

    for preset in ("tiny-denoising-student", "tiny-sid", "tiny-sferd", "tiny-adv-kd"):
        res = train(_rc(preset, tiny_artifacts, tmp_path, "train.steps=2"), tmp_path / preset, progress=False)
        side = export_onnx(res["model"], tmp_path / f"{preset}.onnx")
        assert side["graph"] == "generator" and side["parity"]["max_abs_err"] <= 1e-4
        assert side["method"] == get_preset(preset).method
        assert [i["name"] for i in side["inputs"]] == ["z", "labels"]


def test_export_state_writes_the_product_of_a_saved_state(tiny_artifacts, tmp_path):
    """`onestep distill --export-state` of the last state equals the run's own export; an earlier state differs."""
    from safetensors.torch import load_file

    from training.run import export_state

    rc = _rc("tiny-sid", tiny_artifacts, tmp_path, "train.steps=4", "train.ckpt_every=2")
    train(rc, tmp_path / "run", progress=False)
    states = sorted((tmp_path / "run" / "checkpoints").glob("state-*"))
    assert [s.name for s in states] == ["state-00000002", "state-00000004"]
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    again = load_file(str(export_state(tmp_path / "run", states[-1], tmp_path / "s4.safetensors")))
    early = load_file(str(export_state(tmp_path / "run", states[0], tmp_path / "s2.safetensors")))
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert any(not torch.equal(final[k], early[k]) for k in final)
    assert json.loads((tmp_path / "s2.json").read_text())["iteration"] == 2


def test_sid_continues_from_a_generator_checkpoint(tiny_artifacts, tmp_path):
    """init_from: the generator starts from the given student, the fake score from the teacher again."""
    from onestep.checkpoint import CheckpointError, load_model, save_model

    src = build_method(_rc("tiny-sid", tiny_artifacts, tmp_path))
    gen = src.trainable["generator"]
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(tmp_path / "student.safetensors", gen, gen.spec, extra={"iteration": 7})
    m = build_method(_rc("tiny-sid", tiny_artifacts, tmp_path,
                         f"method_cfg.init_from={json.dumps(str(tmp_path / 'student.safetensors'))}"))
    for a, b in zip(m.trainable["generator"].state_dict().values(), gen.state_dict().values()):
        torch.testing.assert_close(a, b)
    teacher, _ = load_model(tiny_artifacts["teacher_ckpt"])
    for a, b in zip(m.trainable["fake"].state_dict().values(), teacher.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert m.init_report["source_iteration"] == 7
    # the run records where its generator came from
    train(_rc("tiny-sid", tiny_artifacts, tmp_path, "train.steps=2", "train.ckpt_every=0",
              f"method_cfg.init_from={json.dumps(str(tmp_path / 'student.safetensors'))}"), tmp_path / "run",
          progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["init"]["source_sha256"] == json.loads((tmp_path / "student.json").read_text())["sha256"]
    # a teacher is not a generator, and a generator of another sigma_g is another network
    with pytest.raises(CheckpointError, match="one-step generator checkpoint is needed"):
        build_method(_rc("tiny-sid", tiny_artifacts, tmp_path,
                         f"method_cfg.init_from={json.dumps(str(tiny_artifacts['teacher_ckpt']))}"))
    save_model(tmp_path / "other.safetensors", gen, {**gen.spec, "sigma_g": 1.0})
    with pytest.raises(CheckpointError, match="differs from the generator"):
        build_method(_rc("tiny-sid", tiny_artifacts, tmp_path,
                         f"method_cfg.init_from={json.dumps(str(tmp_path / 'other.safetensors'))}"))

"""SFERD and Adv-KD on tiny configs: the guidance formula, falling losses, a frozen teacher, stage-wise training,
one exported graph per student."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep.config import override
from training.presets import get_preset
from training.run import build_method, train


def _rc(preset, tiny_artifacts, tmp_path, *sets):
    return override(get_preset(preset), [f"teacher={json.dumps(str(tiny_artifacts['teacher_ckpt']))}",
                                         f"method_cfg.cache_dir={json.dumps(str(tmp_path / 'pairs'))}", *sets])


def _log(run_dir, key):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _teacher():
    from training.methods.edm import EDMTeacherConfig, make_edm_denoiser
    from training.presets import TINY_UNET

    torch.manual_seed(0)
    return make_edm_denoiser(EDMTeacherConfig(unet=TINY_UNET)).eval()


def test_gaussian_blur_keeps_constants_and_smooths_an_impulse():
    from training.methods.attention_guidance import gaussian_blur

    c = torch.full((1, 2, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(c, 1.5), c)
    imp = torch.zeros(1, 1, 17, 17)
    imp[0, 0, 8, 8] = 1.0
    b = gaussian_blur(imp, 1.0)
    assert abs(float(b.sum()) - 1.0) < 1e-5 and float(b.max()) < 0.2 and float(b[0, 0, 8, 8]) == float(b.max())


def test_attention_guidance_formula_and_w0_identity():
    from training.methods.attention_guidance import AttentionGuidedDenoiser, gaussian_blur

    t = _teacher()
    torch.manual_seed(1)
    x, sigma, labels = torch.randn(3, 1, 32, 32) * 2.0, torch.tensor([0.5, 2.0, 2.0]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        assert torch.equal(AttentionGuidedDenoiser(t, w=0.0)(x, sigma, labels), t(x, sigma, labels))
        g = AttentionGuidedDenoiser(t, w=0.3, blur_sigma=1.0)
        out = g(x, sigma, labels)
        # by hand: x0_guided = x - sigma (eps + w (eps - eps_deg)) with the same mask
        x0 = t(x, sigma, labels)  # the hook now holds the features at x (not at x_deg)
        mask = g.attention_mask((32, 32))
        s = sigma.reshape(-1, 1, 1, 1)
        x0_deg = mask * gaussian_blur(x0, 1.0) + (1 - mask) * x0
        eps = (x - x0) / s
        x_deg = x0_deg + s * eps
        eps_deg = (x_deg - t(x_deg, sigma, labels)) / s
        ref = x - s * (eps + 0.3 * (eps - eps_deg))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert set(mask.unique().tolist()) == {0.0, 1.0} and 0.05 < float(mask.mean()) < 0.95
    assert float((out - x0).abs().max()) > 0  # guidance changes the target


def test_feature_attention_map_sums_to_one_per_image():
    from training.methods.attention_guidance import feature_attention_map

    h = torch.randn(2, 8, 4, 4)
    a = feature_attention_map(h, (4, 4))  # same size: no resampling
    torch.testing.assert_close(a.flatten(1).sum(1), torch.ones(2))


def test_sferd_trains_teacher_frozen_guided_cache_tagged(tiny_artifacts, tmp_path):
    rc = _rc("tiny-sferd", tiny_artifacts, tmp_path, "train.steps=30", "train.log_every=3")
    method = build_method(rc)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    from training.trainer import Trainer

    method.prepare(0)
    Trainer(method, rc.train, tmp_path / "run", run_config=rc.to_dict(), progress=False).fit()
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert all(p.grad is None for p in method.teacher.parameters())
    for key in ("generator/rec", "generator/draft", "generator/latent_dsm"):
        v = _log(tmp_path / "run", key)
        assert np.all(np.isfinite(v)) and np.mean(v[-3:]) < np.mean(v[:3]), key
    manifest = json.loads((tmp_path / "pairs" / "cache.json").read_text())
    assert "attention-guidance(w=0.2" in manifest["teacher_sha256"]
    # the guided targets differ from the plain teacher's on the same seeds
    plain = _rc("tiny-sferd", tiny_artifacts, tmp_path / "plain", "method_cfg.guidance=0.0")
    m0 = build_method(plain)
    m0.prepare(0)
    from training.pair_cache import load_pair_cache

    a, _ = load_pair_cache(tmp_path / "pairs")
    b, _ = load_pair_cache(tmp_path / "plain" / "pairs")
    np.testing.assert_array_equal(a["z"], b["z"])
    assert np.abs(a["x0"].astype(np.float32) - b["x0"].astype(np.float32)).max() > 1e-3


def test_sferd_student_is_one_batch_invariant_graph(tiny_artifacts, tmp_path):
    """The exported student includes the gradient predictor and the unrolled latent sampler: perturb the
    predictor's zero-initialised output so the whole path matters, then check export parity and that a sample
    does not depend on its batch."""
    from exporters.onnx_export import export_onnx
    from onestep.checkpoint import load_model, save_model
    from onestep.noise import seeded_noise

    res = train(_rc("tiny-sferd", tiny_artifacts, tmp_path, "train.steps=2"), tmp_path / "run", progress=False)
    model, meta = load_model(res["model"])
    with torch.no_grad():
        model.predictor.out.weight.normal_(0, 0.05)
    save_model(tmp_path / "perturbed.safetensors", model, meta["model"], extra={"method": "sferd"})
    model, _ = load_model(tmp_path / "perturbed.safetensors")
    z = torch.from_numpy(seeded_noise([3, 4, 5], (1, 32, 32)))
    labels = torch.tensor([1, 2, 3])
    with torch.no_grad():
        full = model(z, labels)
        draft = model.generator(z, labels)
        assert float((full - draft).abs().max()) > 1e-3  # the correction is active
        for i in range(3):
            torch.testing.assert_close(model(z[i:i + 1], labels[i:i + 1]), full[i:i + 1], rtol=1e-4, atol=1e-5)
    side = export_onnx(tmp_path / "perturbed.safetensors", tmp_path / "sferd.onnx")
    assert side["graph"] == "generator" and side["parity"]["max_abs_err"] <= 1e-4
    assert [i["name"] for i in side["inputs"]] == ["z", "labels"]


def test_advkd_trains_stage_by_stage(tiny_artifacts, tmp_path):
    rc = _rc("tiny-adv-kd", tiny_artifacts, tmp_path, "train.log_every=1")
    method = build_method(rc)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    from training.trainer import Trainer

    method.prepare(0)
    assert method.pairs["snapshots"].shape[1:] == (3, 1, 32, 32)
    Trainer(method, rc.train, tmp_path / "run", run_config=rc.to_dict(), progress=False).fit()
    stages = _log(tmp_path / "run", "generator/stage")
    assert stages[0] == 0 and stages[-1] == 3 and stages == sorted(stages)
    assert [method.stage(i) for i in (0, 2, 3, 6, 9, 23, 500)] == [0, 0, 1, 2, 3, 3, 3]
    for key in ("disc/d_loss", "disc/r1", "generator/adv", "generator/rec3"):
        assert np.all(np.isfinite(_log(tmp_path / "run", key))), key
    rec0 = _log(tmp_path / "run", "generator/rec0")
    assert np.mean(rec0[-3:]) < np.mean(rec0[:3])
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], atol=0, rtol=0)
    n_student = sum(p.numel() for p in method.trainable["generator"].parameters())
    n_teacher = sum(p.numel() for p in method.teacher.parameters())
    assert n_student < n_teacher
    # stage k's head works at its resolution
    outs = method.trainable["generator"].forward_stages(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))
    assert [o.shape[-1] for o in outs] == [8, 16, 32, 32]


def test_advkd_discriminator_sees_the_noise():
    """Two different noises with the same image give different logits: D judges (image, z) pairs."""
    from training.methods.advkd_nets import NoiseConditionedDiscriminator

    torch.manual_seed(0)
    d = NoiseConditionedDiscriminator((1, 32, 32), 8, 10, 4)
    x = torch.randn(1, 1, 32, 32).expand(2, -1, -1, -1)
    z = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = d(x, z, 3, torch.tensor([1, 1]))
    assert out.shape == (2,) and float((out[0] - out[1]).abs()) > 0


def test_advkd_config_is_checked(tiny_artifacts, tmp_path):
    with pytest.raises(ValueError, match="stage_steps"):
        build_method(_rc("tiny-adv-kd", tiny_artifacts, tmp_path, "method_cfg.stage_steps=[3,3]"))

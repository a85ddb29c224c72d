"""SFERD and Adv-KD (and Denoising Student on a foreign teacher) on tiny configs: the guidance formula, the
teacher's own attention, the gradient predictor's input, per-stage discriminators and frozen earlier stages, the
adversarial term alone moving the student, and one exported graph per student for any image shape."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onestep.config import override
from training.presets import get_preset
from training.run import build_method, train


def _rc(preset, teacher_ckpt, tmp_path, *sets):
    return override(get_preset(preset), [f"teacher={json.dumps(str(teacher_ckpt))}",
                                         f"method_cfg.cache_dir={json.dumps(str(tmp_path / 'pairs'))}", *sets])


def _log(run_dir, key):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _teacher():
    from training.methods.edm import EDMTeacherConfig, make_edm_denoiser
    from training.presets import TINY_UNET

    torch.manual_seed(0)
    return make_edm_denoiser(EDMTeacherConfig(unet=TINY_UNET)).eval()


def _foreign_teacher(attention: bool = True):
    """An unconditional 3-channel 16x16 EDM teacher (spec as training/methods/edm.py's make_edm_denoiser)."""
    from onestep.nets import UNetConfig
    from training.methods.edm import EDMTeacherConfig, make_edm_denoiser

    torch.manual_seed(0)
    u = UNetConfig(resolution=16, channels=3, block_out_channels=(8, 16), num_classes=0, norm_num_groups=4,
                   attention=attention)
    return make_edm_denoiser(EDMTeacherConfig(unet=u)).eval()


@pytest.fixture(scope="module")
def foreign_ckpt(tmp_path_factory):
    from onestep.checkpoint import save_model

    t = _foreign_teacher(attention=True)
    path = tmp_path_factory.mktemp("foreign") / "teacher-3x16-uncond.safetensors"
    save_model(path, t, t.spec)
    return path


# --- attention guidance -------------------------------------------------------------------------------------
def test_gaussian_blur_keeps_constants_and_smooths_an_impulse():
    from training.methods.attention_guidance import gaussian_blur

    c = torch.full((1, 2, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(c, 3.0, 15), c)
    imp = torch.zeros(1, 1, 17, 17)
    imp[0, 0, 8, 8] = 1.0
    b = gaussian_blur(imp, 1.0)
    assert abs(float(b.sum()) - 1.0) < 1e-5 and float(b.max()) < 0.2 and float(b[0, 0, 8, 8]) == float(b.max())
    # sigma 3 with 15 taps spreads much further than sigma 1
    assert float(gaussian_blur(imp, 3.0, 15)[0, 0, 8, 8]) < 0.5 * float(b[0, 0, 8, 8])


def test_attention_map_is_the_teachers_own_self_attention():
    """With attention layers, the map is the softmax attention of the teacher's last attention layer: compare with
    the probabilities the layer computes itself (classic processor, scores captured), averaged over heads."""
    from diffusers.models.attention_processor import AttnProcessor

    from training.methods.attention_guidance import AttentionGuidedDenoiser, attention_layers

    t = _foreign_teacher(attention=True)
    g = AttentionGuidedDenoiser(t)
    layers = attention_layers(t.net)
    assert g.uses_teacher_attention and g.attention_source == layers[-1][0]
    assert g.attention_source.startswith("up_blocks")  # the decoder's layer, the last the forward pass runs
    name, layer = layers[-1]
    seen = {}
    orig = layer.get_attention_scores

    def spy(q, k, mask=None):
        seen["p"] = orig(q, k, mask)
        return seen["p"]

    layer.get_attention_scores = spy
    layer.set_processor(AttnProcessor())
    torch.manual_seed(1)
    x, sigma = torch.randn(2, 3, 16, 16) * 2, torch.tensor([2.0, 0.7])
    with torch.no_grad():
        g(x, sigma)
    amap = g.attention_map()
    p = seen["p"]  # the layer's own (B * heads, N, N), from its first call (the guided x, not x_deg)
    with torch.no_grad():
        t(x, sigma)  # re-run plain to capture the probabilities at x
    p = seen["p"].reshape(2, layer.heads, *p.shape[1:]).mean(1)
    ref = p.sum(1).reshape(2, 1, *amap.shape[2:])
    torch.testing.assert_close(amap, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(amap.flatten(1).sum(1), torch.full((2,), float(amap[0].numel())))
    mask = g.attention_mask((16, 16))
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0.0 < float(mask.mean()) < 1.0


def test_attention_falls_back_to_feature_attention_without_attention_layers():
    from training.methods.attention_guidance import AttentionGuidedDenoiser, feature_attention_map

    t = _teacher()
    g = AttentionGuidedDenoiser(t)
    assert not g.uses_teacher_attention
    h = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(feature_attention_map(h).flatten(1).sum(1), torch.full((2,), 16.0))


@pytest.mark.parametrize("attention,clip_x0", [(True, True), (False, True), (True, False)])
def test_sferd_guided_target_formula_by_hand(attention, clip_x0):
    """x0_guided = x - sigma (eps_deg + w (eps - eps_deg)), x_deg = M blur(c) + (1 - M) c + sigma eps with
    c = clamp(x0, -1, 1) (the authors' clip_denoised) or x0."""
    from training.methods.attention_guidance import AttentionGuidedDenoiser, gaussian_blur

    t = _foreign_teacher(attention) if attention else _teacher()
    shape = (3, 16, 16) if attention else (1, 32, 32)
    labels = None if attention else torch.tensor([0, 3, 9])
    torch.manual_seed(1)
    x, sigma = torch.randn(3, *shape) * 2.0, torch.tensor([0.5, 2.0, 2.0])
    with torch.no_grad():
        assert torch.equal(AttentionGuidedDenoiser(t, w=1.0)(x, sigma, labels), t(x, sigma, labels))
        g = AttentionGuidedDenoiser(t, clip_x0=clip_x0)  # reference defaults: w 1.3, blur sigma 3, 15 taps
        assert (g.w, g.blur_sigma, g.blur_kernel) == (1.3, 3.0, 15)
        assert AttentionGuidedDenoiser(t).clip_x0
        out = g(x, sigma, labels)
        mask = g.attention_mask(shape[1:])  # the map at x (captured on the first teacher call only)
        x0 = t(x, sigma, labels)
        assert float(x0.abs().max()) > 1.0  # so the clamp matters
        s = sigma.reshape(-1, 1, 1, 1)
        c = x0.clamp(-1, 1) if clip_x0 else x0
        x0_deg = mask * gaussian_blur(c, 3.0, 15) + (1 - mask) * c
        eps = (x - x0) / s
        eps_deg = (x0_deg + s * eps - t(x0_deg + s * eps, sigma, labels)) / s
        ref = x - s * (eps_deg + 1.3 * (eps - eps_deg))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert 0.0 < float(mask.mean()) < 1.0
    assert float((out - x0).abs().max()) > 1e-4  # guidance changes the target


# --- SFERD --------------------------------------------------------------------------------------------------
def test_sferd_gradient_predictor_sees_x_t_and_t(tiny_artifacts, tmp_path):
    """The predictor is called on (x_t, t) = (sigma_g z, sigma_g) (plus the semantic latent and label), both in the
    training step and in the exported forward; its output changes with x_t at fixed latent."""
    m = build_method(_rc("tiny-sferd", tiny_artifacts["teacher_ckpt"], tmp_path))
    g = m.trainable["generator"]
    assert g.sigma_g == 80.0 and not hasattr(m.cfg, "draft_weight")
    seen = []
    g.predictor.register_forward_hook(lambda mod, args, out: seen.append(args))
    torch.manual_seed(0)
    z, labels = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    out = m.step({"z": z, "x0": torch.rand(2, 1, 32, 32) * 2 - 1, "labels": labels, "n": 2}, 0, "generator")
    assert set(out) == {"loss", "rec", "latent_dsm"}
    with torch.no_grad():
        g(z, labels)
    for args in seen:
        x_t, t = args[0], args[1]
        torch.testing.assert_close(x_t, 80.0 * z)
        torch.testing.assert_close(t, torch.full((2,), 80.0))
    with torch.no_grad():
        g.predictor.out.weight.normal_(0, 0.1)
        s = torch.randn(2, g.latent_dim)
        a = g.predictor(80.0 * z, torch.full((2,), 80.0), s, labels)
        b = g.predictor(80.0 * torch.randn_like(z), torch.full((2,), 80.0), s, labels)
    assert float((a - b).abs().max()) > 1e-4


def test_sferd_loss_is_weighted_l2_of_refined_output(tiny_artifacts, tmp_path):
    m = build_method(_rc("tiny-sferd", tiny_artifacts["teacher_ckpt"], tmp_path))
    g = m.trainable["generator"]
    with torch.no_grad():
        g.predictor.out.weight.normal_(0, 0.1)
    torch.manual_seed(0)
    z, x0, labels = torch.randn(2, 1, 32, 32), torch.rand(2, 1, 32, 32) * 2 - 1, torch.tensor([1, 2])
    out = m.step({"z": z, "x0": x0, "labels": labels, "n": 2}, 0, "generator")
    with torch.no_grad():
        ref_out = g.generator(z, labels) + g.grad_scale * g.predictor(80.0 * z, torch.full((2,), 80.0), g.encoder(x0),
                                                                       labels)
        ref = ((1 + 1 / 80.0**2) * (ref_out - x0) ** 2).mean()
    torch.testing.assert_close(out["rec"].detach(), ref, rtol=1e-5, atol=1e-6)


def test_sferd_trains_teacher_frozen_guided_cache_tagged(tiny_artifacts, tmp_path):
    rc = _rc("tiny-sferd", tiny_artifacts["teacher_ckpt"], tmp_path, "train.steps=30", "train.log_every=3")
    method = build_method(rc)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    from training.trainer import Trainer

    method.prepare(0)
    Trainer(method, rc.train, tmp_path / "run", run_config=rc.to_dict(), progress=False).fit()
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert all(p.grad is None for p in method.teacher.parameters())
    for key in ("generator/rec", "generator/latent_dsm"):
        v = _log(tmp_path / "run", key)
        assert np.all(np.isfinite(v)) and np.mean(v[-3:]) < np.mean(v[:3]), key
    manifest = json.loads((tmp_path / "pairs" / "cache.json").read_text())
    assert "attention-guidance(w=1.3,blur=3.0" in manifest["teacher_sha256"]
    assert manifest["teacher_sha256"].endswith(",clip_x0)")
    # the guided targets differ from the plain teacher's on the same seeds
    plain = _rc("tiny-sferd", tiny_artifacts["teacher_ckpt"], tmp_path / "plain", "method_cfg.guidance=1.0")
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

    res = train(_rc("tiny-sferd", tiny_artifacts["teacher_ckpt"], tmp_path, "train.steps=2"), tmp_path / "run",
                progress=False)
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


# --- Adv-KD -------------------------------------------------------------------------------------------------
def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_advkd_per_stage_discriminators_and_frozen_earlier_stages(tiny_artifacts, tmp_path):
    from training.trainer import Trainer

    rc = _rc("tiny-adv-kd", tiny_artifacts["teacher_ckpt"], tmp_path, "method_cfg.stage_steps=[2,2,2,2]",
             "train.steps=8", "train.log_every=1")
    method = build_method(rc)
    teacher_before = _params(method.teacher)
    method.prepare(0)
    assert method.pairs["snapshots"].shape[1:] == (3, 1, 32, 32)
    g = method.trainable["generator"]
    discs = [method.trainable[f"disc{k}"] for k in range(4)]
    assert len({id(d) for d in discs}) == 4 and "disc" not in method.trainable
    assert g.resolutions == (8, 16, 32, 32)
    assert [method.phases(i) for i in (0, 2, 5, 7, 100)] == [["disc0", "generator"], ["disc1", "generator"],
                                                             ["disc2", "generator"], ["disc3", "generator"],
                                                             ["disc3", "generator"]]
    trainer = Trainer(method, rc.train, tmp_path / "run", run_config=rc.to_dict(), progress=False)
    snaps, logs = {}, []
    for it in range(8):
        if it % 2 == 0:  # start of stage it // 2
            snaps[it // 2] = {"blocks": [_params(b) for b in g.blocks], "heads": [_params(h) for h in g.heads],
                              "discs": [_params(d) for d in discs]}
        logs.append(trainer.train_step())
    snaps[4] = {"blocks": [_params(b) for b in g.blocks], "heads": [_params(h) for h in g.heads],
                "discs": [_params(d) for d in discs]}
    for k in range(4):
        for part in ("blocks", "heads", "discs"):
            # stage k changes its own block, head and discriminator ...
            assert not _same(snaps[k][part][k], snaps[k + 1][part][k]), (part, k)
            # ... and nothing of the other stages (earlier ones are frozen, later ones wait their turn)
            for j in range(4):
                if j != k:
                    assert _same(snaps[k][part][j], snaps[k + 1][part][j]), (part, k, j)
    assert _same(teacher_before, _params(method.teacher))
    for key in ("disc0/d_loss", "disc0/penalty", "disc3/d_loss", "generator/adv"):
        v = [r[key] for r in logs if key in r]
        assert v and np.all(np.isfinite(v)), key
    assert [r["generator/stage"] for r in logs] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert all(f"disc{k}/d_loss" in logs[i] for i, k in enumerate([0, 0, 1, 1, 2, 2, 3, 3]))
    n_student = sum(p.numel() for p in g.parameters())
    assert n_student < sum(p.numel() for p in method.teacher.parameters())


def test_advkd_adversarial_term_alone_drives_the_student(tiny_artifacts, tmp_path):
    """With the reconstruction weight 0 (the paper's objective) the generator loss is exactly the non-saturating
    GAN loss of stage k, it has gradients on stage k's block and head, and one step moves the output."""
    m = build_method(_rc("tiny-adv-kd", tiny_artifacts["teacher_ckpt"], tmp_path))
    assert m.cfg.lambda_rec == 0.0 and m.cfg.penalty == "wgan-gp" and m.cfg.disc_weight_clip == 0.1
    g = m.trainable["generator"]
    torch.manual_seed(0)
    batch = {"z": torch.randn(4, 1, 32, 32), "x0": torch.rand(4, 1, 32, 32) * 2 - 1,
             "snapshots": torch.randn(4, 3, 1, 32, 32), "labels": torch.tensor([0, 1, 2, 3]), "n": 4}
    k = 1
    it = m.cfg.stage_steps[0]  # first iteration of stage 1
    m.trainable[f"disc{k}"].requires_grad_(False)
    out = m.step(batch, it, "generator")
    with torch.no_grad():
        fake = g.stage_output(batch["z"], batch["labels"], k)
        ref = F.softplus(-m.trainable[f"disc{k}"](fake, batch["z"], batch["labels"])).mean()
    torch.testing.assert_close(out["loss"].detach(), ref)
    out["loss"].backward()
    assert all(p.grad is None for p in g.stage_parameters(0))  # stage 0 is frozen
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in g.blocks[k].parameters())
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in g.heads[k].parameters())
    opt = torch.optim.Adam(g.stage_parameters(k), lr=1e-3)
    opt.step()
    with torch.no_grad():
        moved = g.stage_output(batch["z"], batch["labels"], k)
    assert float((moved - fake).abs().max()) > 1e-4


def test_advkd_discriminator_penalty_and_noise_conditioning(tiny_artifacts, tmp_path):
    """The discriminator step's penalty is WGAN-GP's (||grad D(x_hat, z)|| - 1)^2 at a real/fake interpolate, and
    two noises with the same image get different logits (D judges (image, z) pairs)."""
    from training.methods.advkd_nets import NoiseConditionedDiscriminator

    torch.manual_seed(0)
    d = NoiseConditionedDiscriminator((1, 32, 32), 8, 10)
    x = torch.randn(1, 1, 32, 32).expand(2, -1, -1, -1)
    z = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        o = d(x, z, torch.tensor([1, 1]))
    assert o.shape == (2,) and float((o[0] - o[1]).abs()) > 0
    m = build_method(_rc("tiny-adv-kd", tiny_artifacts["teacher_ckpt"], tmp_path))
    batch = {"z": torch.randn(3, 1, 32, 32), "x0": torch.rand(3, 1, 32, 32) * 2 - 1,
             "snapshots": torch.randn(3, 3, 1, 32, 32), "labels": torch.tensor([0, 1, 2]), "n": 3}
    torch.manual_seed(5)
    out = m.step(batch, 0, "disc0")
    d0, g = m.trainable["disc0"], m.trainable["generator"]
    with torch.no_grad():
        fake = g.stage_output(batch["z"], batch["labels"], 0)
    real = F.adaptive_avg_pool2d(batch["snapshots"][:, 0], 8).clamp(-1, 1)
    torch.manual_seed(5)
    a = torch.rand(3, 1, 1, 1)
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(d0(x_hat, batch["z"], batch["labels"]).sum(), x_hat)
    torch.testing.assert_close(out["penalty"].detach(), (grad.flatten(1).norm(dim=1) - 1).pow(2).mean(),
                               rtol=1e-4, atol=1e-6)
    assert all(float(p.abs().max()) <= 0.1 + 1e-7 for p in d0.parameters())  # weights clipped to +-0.1


def test_advkd_config_is_checked(tiny_artifacts, tmp_path):
    with pytest.raises(ValueError, match="stage_steps"):
        build_method(_rc("tiny-adv-kd", tiny_artifacts["teacher_ckpt"], tmp_path, "method_cfg.stage_steps=[3,3]"))


# --- every method on a foreign teacher ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-denoising-student", "tiny-sferd", "tiny-adv-kd"])
def test_offline_methods_distil_an_unconditional_3ch_16px_teacher(foreign_ckpt, tmp_path, preset):
    from exporters.onnx_export import export_onnx

    extra = ["method_cfg.stage_steps=[1,1,1,1]"] if preset == "tiny-adv-kd" else []
    rc = _rc(preset, foreign_ckpt, tmp_path, "method_cfg.n_pairs=24", "method_cfg.holdout=4",
             "train.steps=4", "train.ckpt_every=0", *extra)
    m = build_method(rc)
    assert m.image_shape == (3, 16, 16) and m.num_classes == 0
    if preset == "tiny-sferd":
        assert m.guided_teacher.uses_teacher_attention
    res = train(rc, tmp_path / "run", progress=False)
    losses = _log(tmp_path / "run", "generator/loss")
    assert losses and np.all(np.isfinite(losses))
    side = export_onnx(res["model"], tmp_path / "student.onnx")
    assert side["graph"] == "generator" and side["parity"]["max_abs_err"] <= 1e-4
    assert [i["name"] for i in side["inputs"]] == ["z"] and side["image_shape"] == [3, 16, 16]
    assert side["num_classes"] == 0


def test_adv_kd_generator_ema_restarts_with_every_stage(tiny_artifacts, tmp_path):
    """Stage k trains head k from its random initialisation: the generator's EMA starts afresh with the stage
    (at age 0 a power EMA IS the live net), so the exported student holds none of the untrained head and the
    same earlier blocks the head was trained on. Before, one average ran over the whole run: with decay 0.999
    the GPU preset's student was 63% random head 457 iterations into its last stage."""
    from training.trainer import Trainer

    rc = _rc("tiny-adv-kd", tiny_artifacts["teacher_ckpt"], tmp_path, "method_cfg.stage_steps=[2,2,2,4]",
             "train.steps=10", "train.ema_decay=0.9999", "train.extra_ema_sigma_rels=[0.05]")
    method = build_method(rc)
    method.prepare(0)
    assert [method.ema_age(i) for i in range(10)] == [0, 1, 0, 1, 0, 1, 0, 1, 2, 3]
    trainer = Trainer(method, rc.train, tmp_path / "run", run_config=rc.to_dict(), progress=False)
    live = method.trainable["generator"]
    power = trainer.extra_emas["generator@std0.05"].net
    for it in range(7):
        trainer.train_step()
        if it in (0, 2, 4, 6):  # the first iteration of each stage
            for a, b in zip(power.parameters(), live.parameters()):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the classic EMA (decay 0.9999) restarts too: its warm-up min(d, (1+age)/(10+age)) keeps 1/10 of the old
    # average at the stage's first iteration (without the restart: 7/16 at iteration 6)
    rc2 = override(rc, ["method_cfg.stage_steps=[2,2,2,20]", "train.steps=16"])
    method = build_method(rc2)
    method.prepare(0)
    trainer = Trainer(method, rc2.train, tmp_path / "run2", run_config=rc2.to_dict(), progress=False)
    for _ in range(6):
        trainer.train_step()
    before = _params(trainer.emas["generator"].net)
    trainer.train_step()  # iteration 6, the last stage's first
    after, live = _params(trainer.emas["generator"].net), _params(method.trainable["generator"])
    for k in after:
        if after[k].is_floating_point():
            torch.testing.assert_close(after[k], 0.1 * before[k] + 0.9 * live[k])

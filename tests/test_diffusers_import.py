"""diffusers teachers: the adapter, the DDIMPipeline reproduction, the importer and the checkpoint kind.

diffusers itself is the oracle throughout (DDIMPipeline, or DDIMScheduler.step in a loop written here where the
pipeline cannot run: class labels, learned variance). Tolerances are float32 rounding relative to the image scale:
TOL * max|reference|, with TOL = 2e-4 (40x below one uint8 level on [-1, 1]); epsilon prediction at the top of
the schedule amplifies rounding by 1 / sqrt(abar_T) ~ 150 in both implementations, which sets the bound.
"""

import json
import math

import numpy as np
import pytest
import torch

from onestep.checkpoint import CheckpointError, load_model, load_teacher, save_model
from onestep.denoiser import DiffusersEpsDenoiser, OneStepGenerator
from onestep.importer import build_diffusers_denoiser, import_folder, make_spec
from onestep.samplers import diffusers_noise, sample

TOL = 2e-4
SEEDS = [3, 11]
STEPS = 4


def tiny_unet(seed=0, **kw):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    args = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, add_attention=False)
    args.update(kw)
    return UNet2DModel(**args).eval()


def adapter(unet, scheduler):
    """Our denoiser for an in-memory UNet + scheduler, through the checkpoint spec builder."""
    spec = make_spec(unet.config, type(scheduler).__name__, dict(scheduler.config))
    return build_diffusers_denoiser(spec, unet).eval()


def hand_ddim(unet, scheduler_config, x_T, steps, labels=None):
    """DDIMPipeline's loop with class labels passed and the first C output channels kept (pre-clamp)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t, class_labels=labels).sample[:, : x.shape[1]]
            x = sched.step(out, t, x).prev_sample
    return x


def pipeline(unet, scheduler, seeds, steps):
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(batch_size=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                    num_inference_steps=steps, output_type="pt").images


def close(got, ref, tol=TOL):
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    assert err <= tol * scale, f"max|ours - diffusers| = {err:.3g} > {tol:g} * scale {scale:.3g}"


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_reproduces_ddim_pipeline(unet, pred, spacing, offset, clip):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type=pred, timestep_spacing=spacing, steps_offset=offset, clip_sample=clip,
                          clip_sample_range=0.8)
    D = adapter(unet, sched)
    z = diffusers_noise(SEEDS, (3, 16, 16))
    ours = sample(D, z, None, "ddim", STEPS, noise_convention="diffusers")
    close(ours, hand_ddim(unet, sched.config, z, STEPS))
    img = pipeline(unet, sched, SEEDS, STEPS)  # the pipeline draws its own noise from the seeds
    close((ours / 2 + 0.5).clamp(0, 1), img, TOL / max(float(img.abs().max()), 1e-6))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_linspace_and_final_alpha(unet, pred):
    """set_alpha_to_one=False: the last step lands on sigma(abar_0), not 0; linspace: t - T//n steps too."""
    from diffusers import DDIMScheduler

    for spacing, n in (("linspace", 3), ("trailing", 3), ("leading", 7)):
        sched = DDIMScheduler(prediction_type=pred, timestep_spacing=spacing, set_alpha_to_one=False,
                              clip_sample=False)
        D = adapter(unet, sched)
        z = diffusers_noise(SEEDS, (3, 16, 16))
        close(sample(D, z, None, "ddim", n, noise_convention="diffusers"), hand_ddim(unet, sched.config, z, n))


def test_noise_matches_pipeline_generators():
    from diffusers.utils.torch_utils import randn_tensor

    ref = randn_tensor((2, 3, 16, 16), generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    assert torch.equal(diffusers_noise(SEEDS, (3, 16, 16)), ref)
    # batch-independent: each sample's noise depends on its own seed only
    assert torch.equal(diffusers_noise([11], (3, 16, 16))[0], ref[1])


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_adapter_against_scheduler_at_fixed_x_sigma(unet, pred):
    """D(x, sigma) = DDIMScheduler.step's pred_original_sample at the training level t with sigma = sigma_t."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type=pred, clip_sample=False)
    sched.set_timesteps(1000)
    D = adapter(unet, sched)
    torch.manual_seed(1)
    x_vp = torch.randn(2, 3, 16, 16)
    for t in (0, 37, 500, 999):
        abar = sched.alphas_cumprod[t]
        sigma = float(((1 - abar) / abar).sqrt())
        with torch.no_grad():
            ref = sched.step(unet(x_vp, torch.tensor(t)).sample, t, x_vp).pred_original_sample
            got = D(x_vp * math.sqrt(1 + sigma**2), sigma)
        close(got, ref, 1e-4 if pred == "epsilon" else 1e-5)
        assert float(D.sigma_to_t(torch.tensor([sigma]))) == pytest.approx(t, abs=1e-3)
    # between levels the timestep is interpolated in log-sigma
    s0, s1 = float(D.train_sigmas[500]), float(D.train_sigmas[501])
    t_mid = float(D.sigma_to_t(torch.tensor([math.sqrt(s0 * s1)])))
    assert 500.45 < t_mid < 500.55


def test_class_conditional(unet):
    from diffusers import DDIMScheduler

    cu = tiny_unet(1, num_class_embeds=3)
    sched = DDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    D = DiffusersEpsDenoiser(cu, sched.alphas_cumprod, "v_prediction")  # default: carry num_class_embeds
    assert D.num_classes == 3
    with pytest.raises(ValueError, match="pass labels"):
        D(torch.zeros(1, 3, 16, 16), 1.0)
    D = adapter(cu, sched)
    assert D.spec["num_classes"] == 3
    z = diffusers_noise(SEEDS, (3, 16, 16))
    y = torch.tensor([2, 0])
    ours = sample(D, z, y, "ddim", STEPS, noise_convention="diffusers")
    close(ours, hand_ddim(cu, sched.config, z, STEPS, y))
    other = sample(D, z, torch.tensor([1, 1]), "ddim", STEPS, noise_convention="diffusers")
    assert float((other - ours).abs().max()) > 1e-3  # the labels reach the network


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_learned_variance(pred):
    from diffusers import DDIMScheduler, DDPMScheduler

    lu = tiny_unet(2, out_channels=6)
    sched = DDPMScheduler(prediction_type=pred, variance_type="learned_range", clip_sample=False)
    D = adapter(lu, sched)
    assert D.learned_variance
    z = diffusers_noise(SEEDS, (3, 16, 16))
    ours = sample(D, z, None, "ddim", STEPS, noise_convention="diffusers")
    close(ours, hand_ddim(lu, DDIMScheduler.from_config(sched.config).config, z, STEPS))


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_zero_terminal_snr(unet, pred):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type=pred, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          clip_sample=False)
    assert float(sched.alphas_cumprod[-1]) == 0.0
    D = adapter(unet, sched)
    assert D.zero_terminal_snr and math.isinf(float(D.train_sigmas[-1])) and math.isfinite(D.sigma_max)
    z = diffusers_noise(SEEDS, (3, 16, 16))
    ours = sample(D, z, None, "ddim", STEPS, noise_convention="diffusers")  # first step from sigma = inf
    assert torch.isfinite(ours).all()
    close(ours, hand_ddim(unet, sched.config, z, STEPS))
    close((ours / 2 + 0.5).clamp(0, 1), pipeline(unet, sched, SEEDS, STEPS), TOL)
    # our convention too: a trailing DDIM grid starts at sigma = inf; Karras stops at the largest finite sigma
    for sampler, schedule in (("euler", "ddim-trailing"), ("heun", "ddim-trailing"), ("heun", "karras")):
        assert torch.isfinite(sample(D, z, None, sampler, 3, schedule)).all()


def test_zero_terminal_snr_refuses_epsilon(unet):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type="epsilon", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          clip_sample=False)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiffusersEpsDenoiser(unet, sched.alphas_cumprod, "epsilon")
    # what diffusers itself returns there: not an image
    assert not torch.isfinite(pipeline(unet, sched, SEEDS[:1], 2)).all()


def test_learned_time_embedding():
    from diffusers import DDIMScheduler

    lu = tiny_unet(3, time_embedding_type="learned", num_train_timesteps=1000)
    sched = DDIMScheduler(prediction_type="epsilon", clip_sample=False)
    D = adapter(lu, sched)
    z = diffusers_noise(SEEDS, (3, 16, 16))
    ours = sample(D, z, None, "ddim", STEPS, noise_convention="diffusers")
    close((ours / 2 + 0.5).clamp(0, 1), pipeline(lu, sched, SEEDS, STEPS), TOL)
    close(ours, hand_ddim(lu, sched.config, z, STEPS))
    # a sigma between levels snaps to the nearest level, and that level's sigma is used throughout
    s_lo, s_hi = float(D.train_sigmas[300]), float(D.train_sigmas[301])
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(D(x, s_lo + 0.2 * (s_hi - s_lo)), D(x, s_lo), atol=0, rtol=0)
    assert torch.isfinite(sample(D, torch.from_numpy(np.ones((1, 3, 16, 16), np.float32)), None, "heun", 3)).all()


def test_unsupported_unets(unet):
    from diffusers import DDIMScheduler

    abar = DDIMScheduler().alphas_cumprod
    with pytest.raises(ValueError, match="class_embed_type"):
        DiffusersEpsDenoiser(tiny_unet(class_embed_type="timestep"), abar)
    with pytest.raises(ValueError, match="time_embedding_type"):
        DiffusersEpsDenoiser(tiny_unet(time_embedding_type="fourier"), abar)
    with pytest.raises(ValueError, match="num_classes"):
        DiffusersEpsDenoiser(tiny_unet(num_class_embeds=3), abar, num_classes=0)
    with pytest.raises(ValueError, match="diffusers teacher"):
        sample(lambda x, s, y: x, torch.zeros(1, 3, 16, 16), None, "ddim", 2, noise_convention="diffusers")
    with pytest.raises(ValueError, match="sampler must be ddim"):
        sample(adapter(unet, DDIMScheduler()), torch.zeros(1, 3, 16, 16), None, "heun", 2,
               noise_convention="diffusers")


# --- folders, import, checkpoint kind --------------------------------------------------------------------------
def write_pipeline(root, unet, scheduler):
    from diffusers import DDIMPipeline

    DDIMPipeline(unet, scheduler).save_pretrained(root)
    return root


def test_load_pipeline_folder_and_bare_unet_folder(tmp_path, unet):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)  # DDIMPipeline converts it
    pipe = write_pipeline(tmp_path / "pipe", unet, sched)
    bare = tmp_path / "bare"
    unet.save_pretrained(bare)
    sched.save_pretrained(bare)  # scheduler_config.json beside config.json
    D1, m1 = load_teacher(pipe)
    D2, m2 = load_teacher(bare)
    assert m1["sha256"] == m2["sha256"] and m1["source"]["layout"] == "pipeline" and m2["source"]["layout"] == "unet"
    assert m1["model"]["kind"] == "diffusers-denoiser" and m1["model"]["image_shape"] == [3, 16, 16]
    z = diffusers_noise(SEEDS, (3, 16, 16))
    ours = sample(D2, z, None, "ddim", STEPS, noise_convention="diffusers")
    torch.testing.assert_close(ours, sample(D1, z, None, "ddim", STEPS, noise_convention="diffusers"))
    close((ours / 2 + 0.5).clamp(0, 1), pipeline(unet, sched, SEEDS, STEPS), TOL)
    assert D1.scheduler_config["clip_sample"] is True
    # the older entry point still reads folders
    assert isinstance(DiffusersEpsDenoiser.from_pretrained(bare), DiffusersEpsDenoiser)


def test_bin_and_fp16_weights(tmp_path, unet):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type="epsilon")
    binf = tmp_path / "bin"
    unet.save_pretrained(binf, safe_serialization=False)
    sched.save_pretrained(binf)
    assert (binf / "diffusion_pytorch_model.bin").exists()
    D, meta = load_teacher(binf)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(D(x, 3.0), adapter(unet, sched)(x, 3.0), atol=0, rtol=0)
    assert meta["source"]["weight_files"] == ["diffusion_pytorch_model.bin"]

    h = tiny_unet().half()
    half = tmp_path / "fp16"
    h.save_pretrained(half, variant="fp16")
    sched.save_pretrained(half)
    assert (half / "diffusion_pytorch_model.fp16.safetensors").exists()
    Dh, mh = load_teacher(half)
    assert mh["source"]["weights_dtype"] == "float16" and next(Dh.parameters()).dtype == torch.float32
    h32 = h.float()
    z = diffusers_noise(SEEDS, (3, 16, 16))
    close(sample(Dh, z, None, "ddim", STEPS, noise_convention="diffusers"), hand_ddim(h32, sched.config, z, STEPS))
    # stored as fp16 (lossless), rebuilt by the checkpoint kind
    side = import_folder(half, tmp_path / "h.safetensors", steps=2, seeds=[0])
    assert side["dtype"] == "torch.float16" and side["parity"]["rel_err"] <= 1e-3
    Dc, _ = load_model(tmp_path / "h.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(Dc(x, 3.0), Dh(x, 3.0), atol=0, rtol=0)


def test_bad_folders(tmp_path, unet):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel

    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers folder.*found"):
        load_teacher(empty)
    p = write_pipeline(tmp_path / "p", unet, DDIMScheduler())
    (p / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="expected unet/config.json"):
        load_teacher(p)
    bare = tmp_path / "bare"
    unet.save_pretrained(bare)
    with pytest.raises(CheckpointError, match="expected scheduler_config.json"):
        load_teacher(bare)
    EulerDiscreteScheduler().save_pretrained(bare)
    with pytest.raises(CheckpointError, match="EulerDiscreteScheduler.*not supported"):
        load_teacher(bare)
    DDIMScheduler().save_pretrained(bare)
    (bare / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no UNet weights.*expected diffusion_pytorch_model"):
        load_teacher(bare)
    cond = tmp_path / "cond"
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         cross_attention_dim=8, attention_head_dim=2,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(cond)
    DDIMScheduler().save_pretrained(cond)
    with pytest.raises(CheckpointError, match="UNet2DConditionModel.*expected UNet2DModel"):
        load_teacher(cond)


def test_import_checkpoint_and_cli(tmp_path, unet):
    from diffusers import DDIMScheduler

    from onestep.cli import main
    from onestep.data import to_uint8

    sched = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    pipe = write_pipeline(tmp_path / "pipe", unet, sched)
    ckpt = tmp_path / "t.safetensors"
    assert main(["import", str(pipe), "--out", str(ckpt), "--steps", "3", "--seeds", "0", "5"]) == 0
    side = json.loads(ckpt.with_suffix(".json").read_text())
    assert side["model"]["kind"] == "diffusers-denoiser" and side["parity"]["rel_err"] <= 1e-3
    assert side["parity"]["pipeline"]["max_abs_err"] <= 1e-3 and side["parity"]["seeds"] == [0, 5]
    assert side["source"]["sha256"] == load_teacher(pipe)[1]["sha256"]
    assert side["source"]["ddim_settings"]["timestep_spacing"] == "trailing"
    D, meta = load_teacher(ckpt)
    assert meta["sha256"] == side["sha256"]
    # `onestep sample --noise-convention diffusers` gives DDIMPipeline's images
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(ckpt), "--seeds", "0,5", "--steps", "3", "--noise-convention",
                 "diffusers", "--out", str(out)]) == 0
    imgs = np.load(out)["images"]
    ref = to_uint8(pipeline(unet, sched, [0, 5], 3).numpy() * 2 - 1)
    assert np.abs(imgs.astype(int) - ref.astype(int)).max() <= 1
    # our convention: any sampler and schedule on the imported teacher
    assert main(["sample", "--model", str(ckpt), "--seeds", "0-1", "--steps", "2", "--out",
                 str(tmp_path / "g.png")]) == 0
    assert main(["sample", "--model", str(ckpt), "--seeds", "0", "--steps", "2", "--noise-convention", "diffusers",
                 "--sampler", "heun", "--out", str(tmp_path / "x.npz")]) == 2
    # a generator is not a teacher
    G = OneStepGenerator(D, 2.5)
    save_model(tmp_path / "g.safetensors", G, {"kind": "one-step-generator", "sigma_g": 2.5, "denoiser": D.spec})
    with pytest.raises(CheckpointError, match="teacher"):
        load_teacher(tmp_path / "g.safetensors")
    assert main(["import", str(tmp_path / "nope"), "--out", str(tmp_path / "n.safetensors")]) == 2


@pytest.mark.slow
def test_onnx_export_of_imported_teacher_and_generator(tmp_path, unet):
    from diffusers import DDIMScheduler

    from exporters.onnx_export import export_onnx

    pipe = write_pipeline(tmp_path / "pipe", unet, DDIMScheduler(prediction_type="epsilon"))
    ckpt = tmp_path / "t.safetensors"
    import_folder(pipe, ckpt, steps=2, seeds=[0])
    side = export_onnx(ckpt, tmp_path / "t.onnx")
    assert side["graph"] == "denoiser" and side["parity"]["max_abs_err"] <= 1e-4
    D, _ = load_model(ckpt)
    save_model(tmp_path / "g.safetensors", OneStepGenerator(D, 2.5),
               {"kind": "one-step-generator", "sigma_g": 2.5, "denoiser": D.spec})
    side = export_onnx(tmp_path / "g.safetensors", tmp_path / "g.onnx")
    assert side["graph"] == "generator" and side["parity"]["max_abs_err"] <= 1e-4

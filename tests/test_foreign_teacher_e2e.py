"""A user's own diffusion model, end to end: a diffusers DDPM folder (unconditional, 3 channels, 16x16, written
by diffusers' own `DDPMPipeline.save_pretrained`) is distilled by every method through `onestep distill`, each
student is exported with `onestep export onnx` and `onestep export triton`, one is served on the real local
Triton + HTTP API (`onestep serve`), generated offline (`onestep generate`) and benchmarked (`onestep bench`).
Nothing here knows Fashion-MNIST: shapes come from the teacher. The served path (one method) runs by default;
every method and the benchmark run with `-m slow`."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.triton

SHAPE = (3, 16, 16)
METHODS = ("sid", "sida", "emd", "denoising-student", "sferd", "adv-kd")
ROOT = Path(__file__).resolve().parent.parent


def _cli(*argv: str) -> int:
    from onestep.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A tiny random diffusers DDPM pipeline folder and random real data (an .npz and an image folder)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from PIL import Image

    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "ddpm")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)  # N, H, W, C
    np.savez(root / "real.npz", images=images)
    (root / "real").mkdir()
    for i, im in enumerate(images[:8]):
        Image.fromarray(im).save(root / "real" / f"{i:02d}.png")
    return {"root": root, "teacher": root / "ddpm", "npz": root / "real.npz", "folder": root / "real",
            "students": {}}


def _distill(foreign, method: str) -> Path:
    """`onestep distill` of the foreign teacher with the method's tiny preset; returns the ONNX student."""
    if method in foreign["students"]:
        return foreign["students"][method]
    root = foreign["root"]
    run = root / f"run-{method}"
    args = ["distill", "--method", method, "--preset", f"tiny-{method}", "--teacher", foreign["teacher"],
            "--run-dir", run, "--device", "cpu", "--no-resume"]  # --metric auto: none for this teacher
    if method == "sida":
        args += ["--data", foreign["folder"]]
    if method in ("denoising-student", "sferd", "adv-kd"):
        args += ["--set", f"method_cfg.cache_dir={root / f'pairs-{method}'}"]
    assert _cli(*args) == 0, f"onestep distill --method {method} failed"
    model = run / "model.safetensors"
    assert model.exists()
    onnx = root / f"{method}.onnx"
    assert _cli("export", "onnx", "--model", model, "--out", onnx) == 0
    foreign["students"][method] = onnx
    return onnx


@pytest.mark.slow  # six distillations and ONNX exports: minutes on one core
@pytest.mark.parametrize("method", METHODS)
def test_every_method_distils_the_foreign_teacher(foreign, method):
    from exporters.triton_repo import parse_config
    from serving.engine import ImageEngine

    onnx = _distill(foreign, method)
    side = json.loads(Path(str(onnx) + ".json").read_text())
    assert side["image_shape"] == list(SHAPE) and side["num_classes"] == 0
    assert [i["name"] for i in side["inputs"]] == ["z"]  # an unconditional student takes no labels
    eng = ImageEngine(onnx)
    imgs = eng.generate([0, 1, 2])
    assert imgs.shape == (3, *SHAPE) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(eng.generate([1]), imgs[1:2])  # seed -> image, whatever the batch
    with pytest.raises(ValueError, match="unconditional"):
        eng.generate([0], [0])
    repo = foreign["root"] / f"repo-{method}"
    name = method.replace("-", "_")
    assert _cli("export", "triton", "--out", repo, "--student", onnx, "--name", name) == 0
    for model in (name, f"{name}_onnx"):
        cfg = parse_config(repo / model / "config.pbtxt")
        assert "LABEL" not in [i.name for i in cfg.input] and "labels" not in [i.name for i in cfg.input]
        assert list(cfg.output[0].dims) == list(SHAPE)


def test_wrong_data_for_the_foreign_teacher_is_a_clear_error(foreign, tmp_path, capsys):
    """SiDA's real data must match the teacher: 1-channel or 32x32 data is refused with both shapes named."""
    bad = tmp_path / "gray.npz"
    np.savez(bad, images=np.zeros((4, 16, 16), np.uint8))
    args = ["distill", "--method", "sida", "--preset", "tiny-sida", "--teacher", foreign["teacher"],
            "--run-dir", tmp_path / "run", "--device", "cpu", "--metric", "none"]
    assert _cli(*args, "--data", bad) == 2
    err = capsys.readouterr().err
    assert "expects images of 3 channels x 16x16" in err and "holds 1 channel x 16x16" in err
    np.savez(bad, images=np.zeros((4, 3, 32, 32), np.uint8))
    assert _cli(*args, "--data", bad) == 2
    err = capsys.readouterr().err
    assert "expects images of 3 channels x 16x16" in err and "holds 3 channels x 32x32" in err
    assert _cli(*args, "--data", "fashion-mnist") == 2
    assert "Fashion-MNIST holds 1 channel x 28x28" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow  # the benchmark exports the student and the teacher again
def test_foreign_student_generate_and_bench(foreign, tmp_path, capsys):
    onnx = _distill(foreign, "sid")
    out = tmp_path / "gen"
    assert _cli("generate", "--onnx", onnx, "--seeds", "0-5", "--out", out, "--shard-size", "4", "--quiet") == 0
    with np.load(out / "shard-000000.npz") as z:
        assert z["images"].shape == (4, *SHAPE) and "labels" not in z.files
    assert _cli("generate", "--onnx", onnx, "--seeds", "0-5", "--out", tmp_path / "gen2", "--label", "1",
                "--quiet") == 2
    assert "unconditional" in capsys.readouterr().err
    assert not (tmp_path / "gen2" / "job.json").exists()
    stem = tmp_path / "bench"
    assert _cli("bench", "--student", foreign["root"] / "run-sid" / "model.safetensors", "--teacher",
                foreign["teacher"], "--quick", "--backends", "eager,onnxruntime", "--concurrency", "",
                "--workdir", tmp_path / "bench-work", "--out", stem) == 0
    res = json.loads(Path(f"{stem}.json").read_text())
    rows = {(r["backend"], r["model"]) for r in res["rows"]}
    assert {("eager", "student"), ("onnxruntime", "student"), ("onnxruntime", "teacher_euler2")} <= rows


def _post(port: int, body: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", method="POST",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_foreign_student_served_by_triton_and_the_api(foreign, tmp_path):
    from PIL import Image

    from serving.engine import ImageEngine
    from serving.triton_server import free_port

    onnx = _distill(foreign, "sid")
    repo = tmp_path / "repo"
    assert _cli("export", "triton", "--out", repo, "--student", onnx, "--name", "foreign", "--max-batch", "8") == 0
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "onestep.cli", "serve", "--repo", str(repo), "--port", str(port),
                          "--triton-log", str(tmp_path / "triton.log")], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline, last = time.time() + 150, None
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError as e:  # not up yet
                last = e
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline, f"serve never became ready ({last})"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            (info,) = json.loads(r.read())["models"]
        assert info["num_classes"] == 0 and info["image_shape"] == list(SHAPE)
        expected = ImageEngine(onnx).generate([3, 4])
        status, body = _post(port, {"model": "foreign", "seeds": [3, 4], "format": "png"})  # no label
        assert status == 200, body
        imgs = json.loads(body)["images"]
        assert [im["label"] for im in imgs] == [None, None]
        for im, ref in zip(imgs, expected):
            arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(im["data"]))))
            assert arr.shape == (16, 16, 3)
            np.testing.assert_array_equal(arr, ref.transpose(1, 2, 0))  # PNG is lossless: the very same image
        for fmt in ("jpeg", "webp"):
            status, body = _post(port, {"model": "foreign", "seed": 5, "format": fmt, "response": "image"})
            assert status == 200, body
            assert np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).shape == (16, 16, 3)
        status, body = _post(port, {"model": "foreign", "seed": 0, "label": 1})
        assert status == 400 and "unconditional" in json.loads(body)["detail"]
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.parametrize("channels,refused", [(1, []), (3, []), (2, ["jpeg"]), (4, ["jpeg"])])
def test_api_checks_formats_and_labels_against_the_model_before_calling_triton(channels, refused):
    """Requests an image format cannot hold, or labels for an unconditional model, are 400s that name the
    problem; they are answered before Triton is asked (here nothing listens at the Triton address)."""
    from serving.api import APISettings
    from serving.background import APIThread
    from serving.triton_server import free_port

    models = {"m": {"role": "student", "backend": "python", "num_classes": 0, "image_shape": [channels, 8, 8]}}
    with APIThread(APISettings(triton_url=f"127.0.0.1:{free_port()}", models=models, request_timeout_s=5)) as api:
        port = api.port
        for fmt in ("png", "jpeg", "webp", "raw"):
            status, body = _post(port, {"model": "m", "seed": 0, "format": fmt})
            if fmt in refused:
                assert status == 400, body
                detail = json.loads(body)["detail"]
                assert f"{channels}-channel images, which {fmt} cannot hold" in detail and "png" in detail
            else:  # valid request: it reaches Triton, which is not there
                assert status == 503, body
        for extra in ({"label": 0}, {"labels": [1]}):
            status, body = _post(port, {"model": "m", "seed": 0, **extra})
            assert status == 400 and "unconditional" in json.loads(body)["detail"]

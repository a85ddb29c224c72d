"""Class names: from checkpoint metadata into the ONNX sidecar, the Triton repository manifest and GET /v1/models;
and the page's own files under their Content-Security-Policy. No Triton needed (the API answers these alone)."""

import json
import urllib.error
import urllib.request

import pytest

from onestep.checkpoint import CheckpointError, class_names, read_metadata, save_model
from onestep.data import FASHION_MNIST_CLASSES

from conftest import TINY_CLASS_NAMES

FMNIST_SPEC = {"kind": "edm-denoiser", "unet": {"channels": 1, "resolution": 32, "num_classes": 10}}
RGB_SPEC = {"kind": "edm-denoiser", "unet": {"channels": 3, "resolution": 32, "num_classes": 10}}


def test_class_names_from_metadata(tmp_path):
    named = ["a", "b", "c"]
    assert class_names({"class_names": named}, 3) == named
    with pytest.raises(CheckpointError, match="3 names"):
        class_names({"class_names": ["a", "b"]}, 3)
    assert class_names({}, 0) == []
    assert class_names({}, 3) == ["class 0", "class 1", "class 2"]
    fmnist = {"model": FMNIST_SPEC, "run_config": {"data": "fashion-mnist"}}
    assert class_names(fmnist, 10) == list(FASHION_MNIST_CLASSES)
    # 10 classes but 3 channels, or data from elsewhere: not Fashion-MNIST
    assert class_names({"model": RGB_SPEC, "run_config": {"data": "fashion-mnist"}}, 10)[7] == "class 7"
    assert class_names({"model": FMNIST_SPEC, "run_config": {"data": "my.npz"}}, 10)[7] == "class 7"
    # a student distilled from a diffusers folder has that teacher's classes, whatever its data default says
    foreign = {"model": {"kind": "one-step-generator", "denoiser": FMNIST_SPEC},
               "run_config": {"data": "fashion-mnist", "teacher": "path/to/ddpm"}}
    assert class_names(foreign, 10)[7] == "class 7"


def test_a_student_follows_its_teachers_names(tmp_path, tiny_denoiser):
    teacher = tmp_path / "teacher.safetensors"
    save_model(teacher, tiny_denoiser, tiny_denoiser.spec, extra={"class_names": list(TINY_CLASS_NAMES)})
    student = {"model": {"kind": "one-step-generator", "denoiser": tiny_denoiser.spec},
               "run_config": {"data": "fashion-mnist", "teacher": str(teacher)}}
    assert class_names(student, 10) == list(TINY_CLASS_NAMES)


def test_shipped_models_name_fashion_mnist_classes():
    for name in ("fmnist-teacher", "fmnist-teacher-attn", "fmnist-student"):
        meta = read_metadata(f"artifacts/{name}.safetensors", verify=False)
        assert class_names(meta, 10) == list(FASHION_MNIST_CLASSES), name


def test_sidecars_and_manifest_carry_the_names(tiny_artifacts):
    assert tiny_artifacts["student_sidecar"]["class_names"] == list(TINY_CLASS_NAMES)
    assert tiny_artifacts["teacher_sidecar"]["class_names"] == list(TINY_CLASS_NAMES)
    manifest = json.loads((tiny_artifacts["repo"] / "repository.json").read_text())
    assert {k: v["class_names"] for k, v in manifest["models"].items()} == \
        {k: list(TINY_CLASS_NAMES) for k in ("tiny", "tiny_tensor", "tiny_onnx", "teacher_heun3")}


def test_export_refuses_a_wrong_count_of_names(tiny_artifacts, tmp_path):
    from exporters.onnx_export import ExportError, export_onnx

    with pytest.raises(ExportError, match="10 names"):
        export_onnx(tiny_artifacts["student_ckpt"], tmp_path / "bad.onnx", names=["x"])
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("form", ["comma", "lines"])
def test_export_cli_takes_class_names(tiny_artifacts, tmp_path, form):
    from onestep.cli import main

    names = [f"kind {k}" for k in range(10)]
    if form == "comma":
        arg = ", ".join(names)
    else:
        f = tmp_path / "names.txt"
        f.write_text("\n".join(names) + "\n")
        arg = f"@{f}"
    out = tmp_path / "s.onnx"
    assert main(["export", "onnx", "--model", str(tiny_artifacts["student_ckpt"]), "--out", str(out),
                 "--class-names", arg]) == 0
    assert json.loads((tmp_path / "s.onnx.json").read_text())["class_names"] == names


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def api_without_triton(tiny_artifacts):
    """The API on the tiny repository with nothing at its Triton address: models, page and errors still answer."""
    from serving.api import APISettings
    from serving.background import APIThread
    from serving.triton_server import free_port

    settings = APISettings(triton_url=f"127.0.0.1:{free_port()}", repository=str(tiny_artifacts["repo"]),
                           api_key="s3cret", watch_interval_s=30)
    with APIThread(settings) as api:
        yield api


def test_v1_models_carries_class_names(api_without_triton):
    status, _, body = _get(api_without_triton.url + "/v1/models", {"X-API-Key": "s3cret"})
    assert status == 200
    models = {m["name"]: m for m in json.loads(body)["models"]}
    assert set(models) == {"tiny", "teacher_heun3"}
    assert models["tiny"]["role"] == "student" and models["teacher_heun3"]["role"] == "teacher"
    for m in models.values():
        assert m["num_classes"] == 10 and m["class_names"] == list(TINY_CLASS_NAMES)
    assert models["tiny"]["nfe"] == 1 and models["teacher_heun3"]["nfe"] == 5


def test_v1_models_names_classes_of_a_manifest_without_names(tiny_artifacts):
    """Repositories written before manifests carried names: `class k`; unconditional models: none."""
    from serving.api import APISettings
    from serving.background import APIThread
    from serving.triton_server import free_port

    models = {"old": {"role": "student", "backend": "python", "num_classes": 3, "image_shape": [1, 32, 32], "nfe": 1},
              "uncond": {"role": "student", "backend": "python", "num_classes": 0, "image_shape": [3, 16, 16],
                         "nfe": 1}}
    with APIThread(APISettings(triton_url=f"127.0.0.1:{free_port()}", models=models, watch_interval_s=30)) as api:
        status, _, body = _get(api.url + "/v1/models")
    assert status == 200
    got = {m["name"]: m["class_names"] for m in json.loads(body)["models"]}
    assert got == {"old": ["class 0", "class 1", "class 2"], "uncond": []}


def test_page_and_its_files_are_open_and_locked_down(api_without_triton):
    url = api_without_triton.url
    status, headers, body = _get(url + "/")
    assert status == 200
    csp = headers["content-security-policy"]
    for rule in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                 "frame-ancestors 'none'"):
        assert rule in csp
    assert headers["x-content-type-options"] == "nosniff"
    page = body.decode()
    assert "<script>" not in page and "style=" not in page and "http" not in page.replace("http-equiv", "")
    assert 'src="static/page.js"' in page and 'href="static/page.css"' in page
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        status, headers, body = _get(f"{url}/static/{name}")  # no key needed: the page must load to ask for it
        assert status == 200 and headers["content-type"].startswith(kind) and body
        assert "content-security-policy" in headers
    assert "FASHION" not in _get(url + "/static/page.js")[2].decode().upper()  # names come from /v1/models
    key = {"X-API-Key": "s3cret"}
    assert _get(url + "/static/index.html", key)[0] == 404 and _get(url + "/static/..%2Fapi.py", key)[0] == 404
    assert _get(url + "/static/nothing.js")[0] == 401  # only the page's own files are open
    assert _get(url + "/v1/models")[0] == 401  # the key still guards everything else

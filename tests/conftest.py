import os

import pytest

os.environ.setdefault("ONESTEP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))


@pytest.fixture(scope="session")
def tiny_unet_cfg():
    from training.presets import TINY_UNET

    return TINY_UNET


@pytest.fixture
def tiny_denoiser(tiny_unet_cfg):
    import torch

    from training.methods.edm import EDMTeacherConfig, make_edm_denoiser

    torch.manual_seed(0)
    return make_edm_denoiser(EDMTeacherConfig(unet=tiny_unet_cfg)).eval()


def has_fashion_mnist() -> bool:
    from onestep.data import FASHION_MNIST_DIR

    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() or \
        (FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists()


needs_fmnist = pytest.mark.skipif(not has_fashion_mnist(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


# the tiny models are untrained: their class names only need to be distinct and unlike the `class k` fallback
TINY_CLASS_NAMES = ("apple", "boat", "cloud", "drum", "egg", "fern", "gate", "hat", "igloo", "jar")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """A tiny teacher + one-step student (teacher copy at sigma_g = 2.5), exported to ONNX, and a Triton
    repository with the student and a 3-step Heun teacher. Built once per test session (seconds on CPU).
    Both checkpoints name their classes (TINY_CLASS_NAMES) in their metadata, so what the API and the page show
    can be traced to it."""
    import torch

    from exporters.onnx_export import export_onnx
    from exporters.triton_repo import build_repository
    from onestep.checkpoint import save_model
    from onestep.denoiser import OneStepGenerator
    from training.methods.edm import EDMTeacherConfig, make_edm_denoiser
    from training.presets import TINY_UNET

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    d = make_edm_denoiser(EDMTeacherConfig(unet=TINY_UNET))
    save_model(root / "teacher.safetensors", d, d.spec, extra={"class_names": list(TINY_CLASS_NAMES)})
    g = OneStepGenerator(d, 2.5)
    save_model(root / "student.safetensors", g, {"kind": "one-step-generator", "sigma_g": 2.5, "denoiser": d.spec},
               extra={"method": "teacher-copy", "class_names": list(TINY_CLASS_NAMES)})
    s_side = export_onnx(root / "student.safetensors", root / "student.onnx")
    t_side = export_onnx(root / "teacher.safetensors", root / "teacher.onnx")
    build_repository(root / "repo", root / "student.onnx", "tiny", root / "teacher.onnx", (("heun", 3),),
                     max_batch=16, max_queue_delay_us=20000)
    return {"root": root, "student_ckpt": root / "student.safetensors", "teacher_ckpt": root / "teacher.safetensors",
            "student_onnx": root / "student.onnx", "teacher_onnx": root / "teacher.onnx", "repo": root / "repo",
            "student_sidecar": s_side, "teacher_sidecar": t_side}

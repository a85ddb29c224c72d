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

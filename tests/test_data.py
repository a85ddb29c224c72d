import gzip

import numpy as np
import pytest

from conftest import needs_fmnist
from onestep.data import (DataError, load_dataset, load_fashion_mnist, load_image_folder, load_npz, pad_to,
                          read_idx, to_model_range, to_uint8)


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_idx_truncated_and_bad_magic(tmp_path):
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t.gz", arr)
    raw = gzip.open(tmp_path / "t.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x01abcd")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "junk")


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_fake_fashion_mnist_layout_is_padded(tmp_path):
    imgs = np.full((5, 28, 28), 200, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    ds = load_fashion_mnist("test", root=tmp_path)
    assert ds.images.shape == (5, 1, 32, 32) and ds.labels.tolist() == [0, 1, 2, 3, 4]
    assert ds.images[0, 0, 0, 0] == 0 and ds.images[0, 0, 2, 2] == 200  # 2-pixel zero border


@needs_fmnist
def test_real_fashion_mnist():
    ds = load_fashion_mnist("test")
    assert len(ds) == 10_000 and ds.shape == (1, 32, 32) and ds.num_classes == 10
    assert sorted(np.unique(ds.labels).tolist()) == list(range(10))
    assert np.bincount(ds.labels).tolist() == [1000] * 10


def test_npz_and_folder(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.images.shape == (6, 3, 32, 32) and ds.num_classes == 3
    for c in ("cat", "dog"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(imgs[i]).save(tmp_path / "f" / c / f"{i}.png")
    ds = load_image_folder(tmp_path / "f")
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(ds.images[0], imgs[0].transpose(2, 0, 1))
    assert load_dataset(str(tmp_path / "d.npz")).name == "d"


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "none.npz")
    np.savez(tmp_path / "x.npz", pics=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="no array named 'images'"):
        load_npz(tmp_path / "x.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar-11")
    with pytest.raises(DataError, match="do not fit"):
        pad_to(np.zeros((1, 1, 40, 40), np.uint8), 32)


def test_range_conversions():
    u8 = np.array([0, 127, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(to_model_range(u8)), u8)
    assert to_uint8(np.array([-5.0, 5.0])).tolist() == [0, 255]

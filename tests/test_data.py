import gzip

import numpy as np
import pytest

from conftest import needs_fmnist
from onestep.data import (DataError, load_dataset, load_fashion_mnist, load_for_model, load_image_folder, load_npz,
                          pad_to, read_idx, to_model_range, to_uint8)


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


# --- any size and channel count; mismatches against a model are clear errors ---------------------------------
def _png_folder(root, arrays):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"{i:03d}.png")
    return root


# (N, H, W) arrays hold one channel, so that layout only goes with c = 1
@pytest.mark.parametrize("layout,c,size", [(lay, c, size) for lay in ("nhwc", "nchw", "nhw")
                                           for c, size in ((1, 8), (3, 16), (4, 24), (3, 5)) if lay != "nhw" or c == 1])
def test_npz_any_size_and_channels_is_kept_as_stored(tmp_path, layout, c, size):
    rng = np.random.default_rng(c * 100 + size)
    imgs = rng.integers(0, 256, (5, size, size, c), dtype=np.uint8)
    stored = {"nhwc": imgs, "nchw": imgs.transpose(0, 3, 1, 2), "nhw": imgs[..., 0]}[layout]
    np.savez(tmp_path / "d.npz", images=stored)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.shape == (c, size, size) and ds.labels is None and ds.num_classes == 0
    np.testing.assert_array_equal(ds.images, imgs.transpose(0, 3, 1, 2))  # never resized, padded or converted
    assert load_for_model(str(tmp_path / "d.npz"), (c, size, size)).shape == (c, size, size)


@pytest.mark.parametrize("mode,c", [("L", 1), ("RGB", 3), ("RGBA", 4)])
def test_folder_keeps_each_images_own_channels(tmp_path, mode, c):
    rng = np.random.default_rng(c)
    arrays = [rng.integers(0, 256, (12, 20, c) if c > 1 else (12, 20), dtype=np.uint8) for _ in range(3)]
    ds = load_image_folder(_png_folder(tmp_path / "f", arrays))
    assert ds.shape == (c, 12, 20) and ds.labels is None
    np.testing.assert_array_equal(ds.images[1], arrays[1].reshape(12, 20, c).transpose(2, 0, 1))


def test_folder_of_mixed_shapes_names_them(tmp_path):
    rng = np.random.default_rng(0)
    f = _png_folder(tmp_path / "f", [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)])
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(f / "gray.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f / "big.png")
    with pytest.raises(DataError) as e:
        load_image_folder(f)
    msg = str(e.value)
    assert "3 channels x 16x16: 3 file(s)" in msg and "1 channel x 16x16: 1 file(s), e.g. gray.png" in msg
    assert "3 channels x 32x32: 1 file(s), e.g. big.png" in msg


def test_channel_mismatch_says_what_the_teacher_expects_and_what_the_data_has(tmp_path):
    np.savez(tmp_path / "gray.npz", images=np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(DataError) as e:
        load_for_model(str(tmp_path / "gray.npz"), (3, 16, 16), who="the teacher ddpm")
    msg = str(e.value)
    assert "the teacher ddpm expects images of 3 channels x 16x16" in msg
    assert "'gray' holds 1 channel x 16x16" in msg and "convert the images to 3 channels (RGB)" in msg
    assert "resize" not in msg


def test_resolution_mismatch_is_refused_not_resampled(tmp_path):
    rng = np.random.default_rng(1)
    f = _png_folder(tmp_path / "photos", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)])
    with pytest.raises(DataError) as e:
        load_for_model(str(f), (3, 16, 16))
    msg = str(e.value)
    assert "expects images of 3 channels x 16x16" in msg and "'photos' holds 3 channels x 32x32" in msg
    assert "resize them to 16x16 beforehand" in msg and "convert" not in msg
    with pytest.raises(DataError, match="holds 3 channels x 32x32"):
        load_dataset(str(f), size=16)
    with pytest.raises(DataError, match="expects images of 1 channel x 32x32"):
        load_dataset(str(f), channels=1)
    assert load_dataset(str(f), size=32, channels=3).shape == (3, 32, 32)


def test_fashion_mnist_against_other_models_is_refused_before_reading_it(tmp_path):
    # the check happens before the files are looked for, so this holds without the dataset installed
    for shape in ((3, 32, 32), (1, 16, 16)):
        with pytest.raises(DataError, match="Fashion-MNIST holds 1 channel x 28x28"):
            load_for_model("fashion-mnist", shape)
    with pytest.raises(DataError, match="1 channel"):
        load_dataset("fashion-mnist", channels=3)


def test_labels_against_a_conditional_model(tmp_path):
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "nolab.npz", images=imgs)
    with pytest.raises(DataError, match="class-conditional \\(10 classes\\) but dataset 'nolab' has no labels"):
        load_for_model(str(tmp_path / "nolab.npz"), (3, 8, 8), num_classes=10)
    np.savez(tmp_path / "lab.npz", images=imgs, labels=np.array([0, 1, 2, 12]))
    with pytest.raises(DataError, match="has 10 classes but dataset 'lab' has labels up to 12"):
        load_for_model(str(tmp_path / "lab.npz"), (3, 8, 8), num_classes=10)
    assert load_for_model(str(tmp_path / "lab.npz"), (3, 8, 8), num_classes=13).num_classes == 13
    assert load_for_model(str(tmp_path / "nolab.npz"), (3, 8, 8)).labels is None  # unconditional: fine


def test_npz_content_errors(tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="holds no images"):
        load_npz(tmp_path / "empty.npz")
    np.savez(tmp_path / "neg.npz", images=np.full((2, 8, 8), -3.0))
    with pytest.raises(DataError, match=r"\[0, 255\]"):
        load_npz(tmp_path / "neg.npz")
    np.savez(tmp_path / "neglab.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, -1]))
    with pytest.raises(DataError, match="non-negative"):
        load_npz(tmp_path / "neglab.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing_folder/"))


def test_teacher_training_data_must_fit_the_configured_network(tmp_path):
    """build_method checks the data against the network a teacher-training preset builds (no teacher)."""
    from dataclasses import replace

    from onestep.nets import UNetConfig
    from training.methods.edm import EDMTeacherConfig
    from training.presets import RunConfig
    from training.run import build_method

    unet = UNetConfig(resolution=16, channels=3, block_out_channels=(8, 16), num_classes=0, norm_num_groups=4)
    np.savez(tmp_path / "rgb16.npz", images=np.zeros((6, 16, 16, 3), np.uint8))
    rc = RunConfig(method="edm-teacher", data=str(tmp_path / "rgb16.npz"), method_cfg=EDMTeacherConfig(unet=unet))
    method = build_method(rc)
    assert method.data.shape == (3, 16, 16)
    with pytest.raises(DataError, match="method_cfg.unet.channels/resolution\\) expects images of 1 channel x 16x16"):
        build_method(replace(rc, method_cfg=EDMTeacherConfig(unet=replace(unet, channels=1))))
    with pytest.raises(DataError, match="class-conditional"):
        build_method(replace(rc, method_cfg=EDMTeacherConfig(unet=replace(unet, num_classes=10))))


def test_train_cli_takes_data_and_reports_a_mismatch(tmp_path, capsys):
    from onestep.cli import main

    np.savez(tmp_path / "rgb.npz", images=np.zeros((6, 32, 32, 3), np.uint8), labels=np.arange(6))
    code = main(["train", "--preset", "tiny-teacher", "--run-dir", str(tmp_path / "run"), "--data",
                 str(tmp_path / "rgb.npz")])
    assert code == 2
    err = capsys.readouterr().err
    assert "expects images of 1 channel x 32x32" in err and "'rgb' holds 3 channels x 32x32" in err

"""Datasets as uint8 arrays (N, C, H, W) plus int64 labels; converted to [-1, 1] only when batched.

Sources:
- Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files read with numpy,
  28x28 zero-padded to 32x32, the 10 class labels kept for conditioning);
- a user's own `.npz` (arrays `images` N,H,W[,C] or N,C,H,W uint8 and optional `labels`);
- a user's own image folder (`root/<class_name>/*.png|jpg` gives labels, flat folders give none).

Any size and channel count loads. Resizing policy (`load_for_model`): Fashion-MNIST is zero-padded from 28x28
to the model's resolution; a user's data is used exactly as stored, so its channels and size must equal the
model's, and a mismatch is a DataError that says what the model expects and what the data holds.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("ONESTEP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray | None  # int64, (N,) or None for unlabelled data
    num_classes: int
    name: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array. Format: LeCun's MNIST page."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} elements (truncated?)")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.exists():
            return cand
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found under {root}. Install the dataset with\n"
        f"    sudo apt-get install -y dataset-fashion-mnist\n"
        f"or point ONESTEP_FASHION_MNIST at a folder holding the IDX files.")


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (N, C, h, w) uint8 images symmetrically to (N, C, size, size)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise DataError(f"images of {h}x{w} do not fit into {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left)))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, size: int = 32) -> ImageSet:
    if split not in _FMNIST_FILES:
        raise DataError(f"split must be one of {sorted(_FMNIST_FILES)}, got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    img_stem, lab_stem = _FMNIST_FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lab_stem)).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"unexpected Fashion-MNIST image shape {images.shape}")
    images = pad_to(images[:, None], size)
    return ImageSet(np.ascontiguousarray(images), labels, 10, f"fashion-mnist-{split}")


def _to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 2, 3, 4) and images.shape[1] not in (1, 2, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise DataError(f"{source}: expected images (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
    if len(images) == 0:
        raise DataError(f"{source}: holds no images")
    if images.dtype != np.uint8:
        if images.dtype.kind not in "iuf":
            raise DataError(f"{source}: images must be numbers (uint8 in [0, 255]), got dtype {images.dtype}")
        if images.min() < 0 or images.max() > 255:
            raise DataError(f"{source}: non-uint8 images must lie in [0, 255] (got [{images.min()}, "
                            f"{images.max()}])")
        images = images.round().astype(np.uint8)
    return np.ascontiguousarray(images)


def load_npz(path: str | os.PathLike) -> ImageSet:
    """Images as stored (any size, any channel count): nothing is resized, padded or converted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise DataError(f"{path}: no array named 'images' (found {sorted(z.files)})")
            images = _to_nchw(z["images"], str(path))
            labels = z["labels"].astype(np.int64).reshape(-1) if "labels" in z else None
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if labels is not None and len(labels) and labels.min() < 0:
        raise DataError(f"{path}: labels must be non-negative class indices")
    n_cls = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    return ImageSet(images, labels, n_cls, path.stem)


def _native_mode(im) -> str:
    """The PIL mode an image is decoded to: its own channel count, never a silent colour conversion."""
    if im.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        return "L"
    if im.mode == "LA":
        return "LA"
    if im.mode in ("RGBA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return "RGBA"
    return "RGB"


def load_image_folder(root: str | os.PathLike) -> ImageSet:
    """`root/<class>/*.png` -> labelled set (classes sorted by name); `root/*.png` -> unlabelled set.
    Each file is decoded with its own channel count (grayscale 1, RGB 3, with alpha 2 or 4) and kept at its
    own size; every file must then have the same shape (nothing is resized or converted)."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(i, sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS))
              for i, d in enumerate(class_dirs)] if class_dirs else \
        [(None, sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS))]
    files = [(lab, f) for lab, fs in groups for f in fs]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    arrays, labels = [], []
    for lab, f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert(_native_mode(im)), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot decode image {f}: {e}") from e
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        labels.append(lab)
    shapes: dict[tuple, list[Path]] = {}
    for a, (_, f) in zip(arrays, files):
        shapes.setdefault(a.shape, []).append(f)
    if len(shapes) != 1:
        listing = "; ".join(f"{_fmt(s)}: {len(fs)} file(s), e.g. {fs[0].relative_to(root)}"
                            for s, fs in sorted(shapes.items(), key=lambda kv: -len(kv[1])))
        raise DataError(f"{root}: images differ in channels/size ({listing}). Every image must have the same "
                        f"channel count and size: convert and resize them beforehand")
    lab_arr = None if labels[0] is None else np.asarray(labels, dtype=np.int64)
    return ImageSet(np.stack(arrays), lab_arr, len(class_dirs), root.name)


def _fmt(shape) -> str:
    c, h, w = shape
    return f"{c} channel{'s' if c != 1 else ''} x {h}x{w}"


def load_dataset(spec: str, split: str = "train", size: int | None = None,
                 channels: int | None = None) -> ImageSet:
    """'fashion-mnist' | path/to/file.npz | path/to/folder.

    Fashion-MNIST (1 channel, 28x28) is zero-padded to `size` (default 32). A user's .npz or folder is
    returned as stored; when `size` / `channels` are given they must match (else DataError)."""
    if spec in ("fashion-mnist", "fmnist"):
        if channels not in (None, 1):
            raise DataError(f"Fashion-MNIST has 1 channel (grayscale), {channels} channels were asked for")
        return load_fashion_mnist(split, size=size or 32)
    p = Path(spec)
    if p.suffix == ".npz":
        ds = load_npz(p)
    elif p.is_dir():
        ds = load_image_folder(p)
    elif not p.exists() and (p.suffix or "/" in spec):
        raise DataError(f"dataset {spec!r} does not exist")
    else:
        raise DataError(f"unknown dataset {spec!r}: use 'fashion-mnist', a .npz file or an image folder")
    if size is not None or channels is not None:
        c, h, w = ds.shape
        check_shape(ds, (channels or c, size or h, size or w), "the model")
    return ds


def check_shape(ds: ImageSet, expected, who: str = "the teacher") -> ImageSet:
    """Raise a DataError saying what `who` expects and what the data holds when the shapes differ."""
    expected = tuple(int(x) for x in expected)
    if ds.shape == expected:
        return ds
    c, h, w = ds.shape
    ec, eh, ew = expected
    fixes = []
    if c != ec:
        fixes.append(f"convert the images to {ec} channel{'s' if ec != 1 else ''}"
                     + (" (grayscale)" if ec == 1 else " (RGB)" if ec == 3 else ""))
    if (h, w) != (eh, ew):
        fixes.append(f"resize them to {eh}x{ew} beforehand (user data is never resized or padded here)")
    raise DataError(f"{who} expects images of {_fmt(expected)}, but dataset {ds.name!r} holds {_fmt(ds.shape)}: "
                    + " and ".join(fixes))


def load_for_model(spec: str, image_shape, split: str = "train", who: str = "the teacher",
                   num_classes: int = 0) -> ImageSet:
    """Load `spec` for a model that works on `image_shape` (C, H, W) images, with clear errors on mismatch.

    Resizing policy: Fashion-MNIST's 28x28 images are zero-padded (centred) to the model's resolution, as the
    shipped models were trained; a user's .npz or image folder is used exactly as stored, so its channel count
    and size must equal the model's (no resampling, padding or colour conversion happens behind your back).
    For a class-conditional model the data must carry labels in [0, num_classes)."""
    c, h, w = (int(x) for x in image_shape)
    if spec in ("fashion-mnist", "fmnist"):
        if c != 1 or h != w or h < 28:
            raise DataError(f"{who} expects images of {_fmt((c, h, w))}, but Fashion-MNIST holds "
                            f"{_fmt((1, 28, 28))} (zero-padded to the model's resolution when that is 28 or more): "
                            f"pass your own data with --data FOLDER_OR_NPZ")
        ds = load_fashion_mnist(split, size=h)
    else:
        ds = check_shape(load_dataset(spec, split), (c, h, w), who)
    if num_classes:
        if ds.labels is None:
            raise DataError(f"{who} is class-conditional ({num_classes} classes) but dataset {ds.name!r} has no "
                            f"labels: use class sub-folders (root/<class>/*.png) or a 'labels' array in the .npz")
        if len(ds.labels) and ds.labels.max() >= num_classes:
            raise DataError(f"{who} has {num_classes} classes but dataset {ds.name!r} has labels up to "
                            f"{int(ds.labels.max())}")
    return ds


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] with rounding and clipping (the serving post-processing)."""
    return np.clip(np.rint((np.asarray(images, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)

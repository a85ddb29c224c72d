"""Datasets as uint8 arrays (N, C, H, W) plus int64 labels; converted to [-1, 1] only when batched.

Sources:
- Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files read with numpy,
  28x28 zero-padded to 32x32, the 10 class labels kept for conditioning);
- a user's own `.npz` (arrays `images` N,H,W[,C] or N,C,H,W uint8 and optional `labels`);
- a user's own image folder (`root/<class_name>/*.png|jpg` gives labels, flat folders give none).
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
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise DataError(f"{source}: expected images (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise DataError(f"{source}: non-uint8 images must lie in [0, 255]")
        images = images.round().astype(np.uint8)
    return np.ascontiguousarray(images)


def load_npz(path: str | os.PathLike, size: int | None = None) -> ImageSet:
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise DataError(f"{path}: no array named 'images' (found {sorted(z.files)})")
            images = _to_nchw(z["images"], str(path))
            labels = z["labels"].astype(np.int64).reshape(-1) if "labels" in z else None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if size is not None and images.shape[-1] != size:
        images = pad_to(images, size)
    n_cls = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    return ImageSet(images, labels, n_cls, path.stem)


def load_image_folder(root: str | os.PathLike, size: int | None = None, channels: int | None = None) -> ImageSet:
    """`root/<class>/*.png` -> labelled set (classes sorted by name); `root/*.png` -> unlabelled set."""
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
            im = Image.open(f)
            im = im.convert("L" if channels == 1 else "RGB" if channels == 3 else
                            ("L" if im.mode in ("L", "1", "I;16") else "RGB"))
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot decode image {f}: {e}") from e
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        labels.append(lab)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{root}: images differ in size/channels {sorted(shapes)}; pass size= to resize")
    lab_arr = None if labels[0] is None else np.asarray(labels, dtype=np.int64)
    return ImageSet(np.stack(arrays), lab_arr, len(class_dirs), root.name)


def load_dataset(spec: str, split: str = "train", size: int = 32) -> ImageSet:
    """'fashion-mnist' | path/to/file.npz | path/to/folder."""
    if spec in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(split, size=size)
    p = Path(spec)
    if p.suffix == ".npz":
        return load_npz(p, size=size)
    if p.is_dir():
        return load_image_folder(p, size=size)
    raise DataError(f"unknown dataset {spec!r}: use 'fashion-mnist', a .npz file or an image folder")


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] with rounding and clipping (the serving post-processing)."""
    return np.clip(np.rint((np.asarray(images, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)

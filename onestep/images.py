"""Image helpers on numpy (no torch): uint8 conversion lives in onestep.data; grids and encoding here."""

from __future__ import annotations

import io
import os

import numpy as np


def make_grid(images_u8: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) uint8 -> (H', W', C) uint8 grid image."""
    n, c, h, w = images_u8.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.zeros((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images_u8[i]
    return grid.transpose(1, 2, 0)


def encode_image(image_hwc: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """(H, W, C) uint8 -> encoded bytes (png | jpeg | webp)."""
    from PIL import Image

    fmt = fmt.lower()
    pil_fmt = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}.get(fmt)
    if pil_fmt is None:
        raise ValueError(f"unknown image format {fmt!r}")
    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    buf = io.BytesIO()
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(arr).save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()


def save_grid(path: str | os.PathLike, images_u8: np.ndarray, nrow: int | None = None, scale: int = 2) -> None:
    from onestep.provenance import atomic_write_bytes

    grid = make_grid(images_u8, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    atomic_write_bytes(path, encode_image(grid, "png"))

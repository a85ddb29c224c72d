"""seed -> noise -> model -> uint8 image, in-process on onnxruntime (no torch, no Triton).

The same object runs inside the Triton python-backend model and in `onestep generate --onnx`, so a
(seed, label) gives the same image through every path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from onestep.noise import seeded_noise


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 with rounding (same as onestep.data.to_uint8)."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ImageEngine:
    """mode 'generator': one call of the student graph; mode 'teacher': an N-step sampler around the
    denoiser graph (`sampler` euler|heun, `steps`, karras schedule over the sidecar's sigma range)."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 sampler: str = "heun", steps: int = 18, intra_op_threads: int = 0, meta: dict | None = None):
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if meta is None:
            side = onnx_path.with_name(onnx_path.name + ".json")
            if not side.exists():
                raise FileNotFoundError(f"{onnx_path} has no sidecar {side.name}")
            meta = json.loads(side.read_text())
        self.meta = meta
        self.mode = "generator" if meta["graph"] == "generator" else "teacher"
        self.shape = tuple(meta["image_shape"])
        self.num_classes = int(meta.get("num_classes") or 0)
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        available = ort.get_available_providers()
        providers = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=list(providers))
        self.nfe = 1
        if self.mode == "teacher":
            from onestep.samplers import SAMPLERS, make_sigmas, nfe

            self.sampler = SAMPLERS[sampler]
            self.sigmas = make_sigmas("karras", steps, float(meta["sigma_min"]), float(meta["sigma_max"]))
            self.nfe = nfe(sampler, steps)

    def check_labels(self, labels, n: int):
        if not self.num_classes:
            if labels is not None:
                raise ValueError("this model is unconditional: do not pass labels")
            return None
        if labels is None:
            raise ValueError(f"labels are required ({self.num_classes} classes)")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} seeds")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        return labels

    def _denoise(self, x, sigma, labels):
        feeds = {"x": x.astype(np.float32, copy=False), "sigma": sigma.astype(np.float32, copy=False)}
        if labels is not None:
            feeds["labels"] = labels
        return self.session.run(None, feeds)[0]

    def model_output(self, z: np.ndarray, labels) -> np.ndarray:
        """Float image in [-1, 1] from unit noise (the model stage alone, for per-stage timing)."""
        if self.mode == "generator":
            feeds = {"z": z}
            if labels is not None:
                feeds["labels"] = labels
            return self.session.run(None, feeds)[0]
        return np.clip(self.sampler(self._denoise, z, self.sigmas, labels), -1.0, 1.0)

    def generate(self, seeds: Sequence[int], labels=None) -> np.ndarray:
        seeds = [int(s) for s in seeds]
        labels = self.check_labels(labels, len(seeds))
        z = seeded_noise(seeds, self.shape)
        return to_uint8(self.model_output(z, labels))

"""seed -> noise -> model -> uint8 image, in-process on onnxruntime (no torch, no Triton).

The same object runs inside the Triton python-backend model and in `onestep generate --onnx`, so a
(seed, label) gives the same image through every path.

Devices: the session runs on exactly the execution providers asked for, or the engine refuses to start
(`ProviderError`): a CUDA request on a CPU-only onnxruntime, or a CUDA provider that onnxruntime could not
start (missing CUDA/cuDNN libraries, no GPU), is an error, never a silent fall back to the CPU. On CUDA the
network runs through onnxruntime's I/O binding: the noise is made on the host exactly as on the CPU, bound
as the input (one host-to-device copy), and the output is bound to a host array that becomes the result
(one device-to-host copy, no further allocation or conversion).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from onestep.noise import seeded_noise

CUDA = "CUDAExecutionProvider"
# Fixed CUDA provider options, so every replica on one GPU model computes the same bytes: cuDNN's heuristic
# picks the convolution algorithm from the shapes alone (the default, EXHAUSTIVE, times candidates on each
# replica and may pick differently from one start to the next), and TF32 stays off so the fp32 graph runs in
# fp32, as it does on the CPU.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}


class ProviderError(RuntimeError):
    """The requested onnxruntime execution providers cannot run here."""


def check_placement(kind: str, providers: Sequence[str]) -> None:
    """A Triton instance group kind ('cpu'/'gpu', or Triton's 'CPU'/'GPU') and the providers must agree: a GPU
    instance whose network runs on the CPU, or a CUDA provider on an instance Triton placed on no GPU, is a
    configuration error."""
    kind = kind.lower()
    if kind == "gpu" and CUDA not in providers:
        raise ProviderError(f"a GPU instance needs {CUDA} among the providers (got {','.join(providers)}): "
                            f"the network would run on the CPU")
    if kind != "gpu" and CUDA in providers:
        raise ProviderError(f"{CUDA} needs a GPU instance (instance_group KIND_GPU, `onestep export triton "
                            f"--kind gpu`), which is where Triton gives each instance its GPU; this one is {kind}")


def session_providers(providers: Sequence[str], device_id: int = 0, available: Sequence[str] | None = None) -> list:
    """The `providers` argument of onnxruntime.InferenceSession: every requested provider must exist in this
    onnxruntime build (ProviderError otherwise); the CUDA provider gets `device_id` and CUDA_OPTIONS."""
    providers = [p for p in providers if p]
    if not providers:
        raise ProviderError("no execution provider given")
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        hint = (" (the CUDA provider comes with the onnxruntime-gpu package, installed instead of onnxruntime, "
                "and needs an NVIDIA GPU)") if CUDA in missing else ""
        raise ProviderError(f"this onnxruntime has no {', '.join(missing)}; it offers {', '.join(available)}{hint}")
    return [(p, {"device_id": str(int(device_id)), **CUDA_OPTIONS}) if p == CUDA else p for p in providers]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 with rounding (same as onestep.data.to_uint8)."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ImageEngine:
    """mode 'generator': one call of the student graph; mode 'teacher': an N-step sampler around the
    denoiser graph (`sampler` euler|heun, `steps`, karras schedule over the sidecar's sigma range)."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 sampler: str = "heun", steps: int = 18, intra_op_threads: int = 0, meta: dict | None = None,
                 device_id: int = 0, io_binding: bool | None = None, intra_op_spinning: bool = True):
        """`providers`: onnxruntime execution providers, all required (see the module docstring); `device_id`:
        the GPU of the CUDA provider; `io_binding`: run through I/O binding (default: on CUDA only);
        `intra_op_spinning`: whether onnxruntime's intra-op threads busy-wait for work between operators and
        calls (its default; off leaves the cores to the other processes of a served path)."""
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
        if not intra_op_spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.intra_op_spinning = bool(intra_op_spinning)
        requested = session_providers(providers, device_id)
        names = [p if isinstance(p, str) else p[0] for p in requested]
        if CUDA in names:
            opts.use_deterministic_compute = True
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=requested)
        active = self.session.get_providers()
        lost = [p for p in names if p not in active]
        if lost:  # onnxruntime drops a provider it cannot start (e.g. CUDA without its libraries) with a warning
            raise ProviderError(f"onnxruntime could not start {', '.join(lost)} (the session runs on "
                                f"{', '.join(active)}): check the GPU, the driver and the CUDA/cuDNN libraries "
                                f"onnxruntime-gpu {ort.__version__} needs")
        self.providers = active
        self.device = "cuda" if CUDA in active else "cpu"
        self.device_id = int(device_id) if self.device == "cuda" else None
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self._out_name = meta["outputs"][0]["name"]
        self._out_dtype = np.dtype(meta["outputs"][0]["dtype"])
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

    def _run(self, feeds: dict) -> np.ndarray:
        """The graph's output for `feeds` (host arrays, batch first)."""
        if not self.io_binding:
            return self.session.run(None, feeds)[0]
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}  # referenced until the run returns
        out = np.empty((len(next(iter(feeds.values()))), *self.shape), dtype=self._out_dtype)
        io = self.session.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        io.bind_output(self._out_name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        return out

    def _denoise(self, x, sigma, labels):
        feeds = {"x": x.astype(np.float32, copy=False), "sigma": sigma.astype(np.float32, copy=False)}
        if labels is not None:
            feeds["labels"] = labels
        return self._run(feeds)

    def model_output(self, z: np.ndarray, labels) -> np.ndarray:
        """Float image in [-1, 1] from unit noise (the model stage alone, for per-stage timing)."""
        if self.mode == "generator":
            feeds = {"z": z}
            if labels is not None:
                feeds["labels"] = labels
            return self._run(feeds)
        return np.clip(self.sampler(self._denoise, z, self.sigmas, labels), -1.0, 1.0)

    def generate(self, seeds: Sequence[int], labels=None) -> np.ndarray:
        seeds = [int(s) for s in seeds]
        labels = self.check_labels(labels, len(seeds))
        z = seeded_noise(seeds, self.shape)
        return to_uint8(self.model_output(z, labels))

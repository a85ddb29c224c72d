"""The CUDA side of `onestep bench --device cuda`: which GPU this is, the matmul peak it reaches in this process,
and the GPU paths the benchmark times.

- Timing: every torch path on the GPU calls torch.cuda.synchronize() at the end of each timed call, so a call's
  time holds its GPU work; the call is split into two stages, "enqueue (host)" (Python, dispatch and kernel
  launches) and "wait for GPU (synchronize)" (what the GPU still had to do once everything was launched). A
  path whose wait is small is bound by launches, not by the GPU.
- torch.compile: backend `compile` uses mode "max-autotune-no-cudagraphs" (autotuned Triton kernels, launched
  one by one), `compile-cudagraphs` uses mode "reduce-overhead" (the compiled network replayed as a CUDA
  graph). Both compile with dynamic=False, one specialisation per batch size. CUDA graphs apply to one network
  call: the student is one replay per image batch; the teacher's sampler stays a Python loop over the compiled
  denoiser, so a teacher image costs NFE replays with the sampler's few element-wise ops launched eagerly
  between them (the whole multi-step loop is not one graph).
- TensorRT: engines built by exporters/tensorrt_export.py (the engine cache, precision flag and sidecar) and run
  by serving/trt_runner.py; the teacher's sampler calls the denoiser engine once per NFE, as the served teacher
  calls onnxruntime.
- Peak: a large square matmul in bf16, fp16 and fp32 (TF32 as torch has it, off by default), timed with CUDA
  events around back-to-back calls; MFU is achieved FLOP/s over the bf16 figure.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import time
from pathlib import Path

import numpy as np

TORCH_BACKENDS = ("eager", "compile", "compile-cudagraphs")
COMPILE_MODES = {"compile": "max-autotune-no-cudagraphs", "compile-cudagraphs": "reduce-overhead"}
GPU_ONLY_BACKENDS = ("compile-cudagraphs", "tensorrt")
PEAK_DTYPES = ("bfloat16", "float16", "float32")
REFERENCE_DTYPE = "bfloat16"  # MFU is measured against this matmul
DEFAULT_MATMUL_N = 8192
DEFAULT_BATCHES = "1,8,64,256"
DEFAULT_BACKENDS = "eager,compile,compile-cudagraphs,onnxruntime,tensorrt,triton-grpc"
DEFAULT_OUT = "benchmarks/results/latency_gpu"


class DeviceUnavailable(ValueError):
    """--device cuda was asked for where no CUDA device can be used."""


def cuda_problem() -> str | None:
    """Why torch cannot run on a GPU here, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        why = (f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no GPU (check the driver, "
               f"nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return (f"--device cuda needs an NVIDIA GPU and a CUDA build of torch: torch.cuda.is_available() is False, "
            f"{why}. Nothing was measured.")


def require_cuda() -> None:
    why = cuda_problem()
    if why:
        raise DeviceUnavailable(why)


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. '550.54.15'), from /proc or nvidia-smi."""
    try:
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d[\w.]*)", Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cuda_driver_api_version() -> str | None:
    """The newest CUDA version the installed driver supports (cuDriverGetVersion), e.g. '12.4'."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
        return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except (OSError, AttributeError):
        return None


def gpu_info(index: int = 0) -> dict:
    """What the results need to say about the GPU, its driver and the CUDA stack in this process."""
    import torch

    p = torch.cuda.get_device_properties(index)
    info = {"gpu": torch.cuda.get_device_name(index), "gpu_count": torch.cuda.device_count(),
            "gpu_compute_capability": f"{p.major}.{p.minor}", "gpu_memory_gib": round(p.total_memory / 2**30, 1),
            "gpu_driver": driver_version(), "cuda_driver_api": cuda_driver_api_version(),
            "cuda_torch": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return info


def measure_matmul_peak(dtype: str, n: int = DEFAULT_MATMUL_N, seconds: float = 2.0, inner: int = 10) -> dict:
    """FLOP/s of an n x n x n matmul of `dtype` on the GPU: CUDA events around `inner` back-to-back calls into
    one preallocated output, repeated for at least `seconds`; the best timing is the practical ceiling."""
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=dt, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=dt, generator=gen)
    c = torch.empty(n, n, device="cuda", dtype=dt)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - t0 < seconds and len(times) < 2000):
        start.record()
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    best = min(times)
    del a, b, c
    torch.cuda.empty_cache()
    return {"matmul_n": n, "dtype": dtype, "best_s": best, "median_s": float(np.median(times)),
            "flops_per_s": 2 * n**3 / best, "timings": len(times),
            "timer": f"CUDA events around {inner} back-to-back matmuls",
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if dtype == "float32" else None}


def measure_peaks(n: int = DEFAULT_MATMUL_N, seconds: float = 2.0) -> dict[str, dict]:
    return {dt: measure_matmul_peak(dt, n, seconds) for dt in PEAK_DTYPES}


def synced(fn):
    """fn, then torch.cuda.synchronize(): the call's time holds its GPU work, split into enqueue and wait."""
    import torch

    sync = torch.cuda.synchronize
    perf = time.perf_counter

    def call() -> dict:
        t0 = perf()
        fn()
        t1 = perf()
        sync()
        t2 = perf()
        return {"enqueue (host)": t1 - t0, "wait for GPU (synchronize)": t2 - t1}

    return call


class CudaGraphCall:
    """A module compiled with mode "reduce-overhead", called so that a sampler may keep its outputs: each call
    starts a new CUDA-graph generation and returns a copy (a replay overwrites the graph's output buffer)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        import torch

        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args).clone()


def compile_pair(backend: str, student, teacher) -> tuple:
    """(student, teacher denoiser) compiled for `backend` ('compile' or 'compile-cudagraphs') on the GPU."""
    import torch
    import torch._dynamo.config as dynamo_config

    # one specialisation per (batch size, mode) of the same forward code: lift the recompile limit (8) and make
    # reaching it an error, so a `compile` row can never be an eager fall-back in disguise
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, True)
    mode = COMPILE_MODES[backend]
    s = torch.compile(student, mode=mode, dynamic=False)
    t = torch.compile(teacher, mode=mode, dynamic=False)
    if backend == "compile-cudagraphs":
        return CudaGraphCall(s), CudaGraphCall(t)
    return s, t


def onnxruntime_cuda_problem() -> str | None:
    """Why onnxruntime cannot run on the CUDA provider here, or None (the provider may still fail to start:
    serving.engine.ImageEngine then refuses, and the benchmark says so)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    from serving.engine import CUDA

    if CUDA not in ort.get_available_providers():
        return (f"this onnxruntime ({ort.__version__}) has no {CUDA}: install onnxruntime-gpu instead of "
                f"onnxruntime (never both)")
    return None


def tensorrt_problem() -> str | None:
    """'not installed ...' when TensorRT or cuda-python cannot be imported here, else None."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("not installed (no `tensorrt` Python package; it ships in NVIDIA's containers, "
                "nvcr.io/nvidia/tritonserver or nvcr.io/nvidia/tensorrt)")
    if importlib.util.find_spec("cuda") is None:
        return "not installed (tensorrt is here, but cuda-python, which serving/trt_runner.py needs, is not)"
    return None


class TensorRTImage:
    """The model stage of serving.engine.ImageEngine on a TensorRT engine: the student graph in one engine call,
    or the teacher's sampler around the denoiser engine (one engine call per NFE), same inputs and clipping."""

    def __init__(self, engine_path: str | Path, meta: dict, sampler: str | None = None, steps: int | None = None):
        from serving.trt_runner import TensorRTRunner

        self.runner = TensorRTRunner(engine_path)
        self.generator = meta["graph"] == "generator"
        self.has_labels = "labels" in self.runner.names
        if not self.generator:
            from onestep.samplers import SAMPLERS, make_sigmas

            self.sampler = SAMPLERS[sampler]
            self.sigmas = make_sigmas("karras", steps, float(meta["sigma_min"]), float(meta["sigma_max"]))

    def _feeds(self, first: str, x, labels, sigma=None) -> dict:
        feeds = {first: np.ascontiguousarray(x, dtype=np.float32)}
        if sigma is not None:
            feeds["sigma"] = np.ascontiguousarray(sigma, dtype=np.float32)
        if self.has_labels and labels is not None:
            feeds["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
        return feeds

    def model_output(self, z: np.ndarray, labels) -> np.ndarray:
        if self.generator:
            return self.runner.run(self._feeds("z", z, labels))
        return np.clip(self.sampler(lambda x, s, lab: self.runner.run(self._feeds("x", x, lab, s)), z, self.sigmas,
                                    labels), -1.0, 1.0)


def tensorrt_engines(s_onnx: Path, t_onnx: Path, teachers: list[tuple[str, str, int]], cache_dir: Path,
                     precision: str, max_batch: int) -> tuple[dict, dict]:
    """Build (or take from the engine cache) the student and teacher-denoiser engines for batches
    1..max_batch; returns ({model name: TensorRTImage}, what was built: precision, profile, parity)."""
    from exporters.onnx_export import read_sidecar
    from exporters.tensorrt_export import build_engine

    profile = (1, max_batch, max_batch)
    built = {}
    out = {}
    for role, onnx in (("student", s_onnx), ("teacher", t_onnx)):
        side = build_engine(onnx, cache_dir, precision=precision, profile=profile)
        built[role] = {k: side.get(k) for k in ("path", "precision", "profile", "parity", "build_seconds",
                                                "cache_hit", "tensorrt_version", "compute_capability")}
        meta = read_sidecar(onnx)
        if role == "student":
            out["student"] = TensorRTImage(side["path"], meta)
        else:
            for name, sampler, steps in teachers:
                out[name] = TensorRTImage(side["path"], meta, sampler, steps)
    return out, built

"""`onestep export tensorrt`: a TensorRT engine from an exported ONNX file, through TensorRT's Python API.

- precision flags fp16 / bf16 (fp32 otherwise), one optimisation profile over the batch axis (min/opt/max),
  a persistent timing cache;
- an engine cache keyed by (ONNX sha256, TensorRT version, GPU compute capability, precision, profile), so an
  engine built for another GPU, TensorRT or ONNX file is never loaded;
- a JSON sidecar like every other artifact.
TensorRT is not installable from PyPI on machines without NVIDIA's index; it ships in NVIDIA's containers
(nvcr.io/nvidia/tensorrt, nvcr.io/nvidia/tritonserver). Elsewhere this module raises a clear error.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from exporters.onnx_export import ExportError, artifact_sidecar, read_sidecar
from onestep.provenance import atomic_write_bytes, atomic_write_json, sha256_file, stamp

WHERE = ("TensorRT is not available here. It runs inside NVIDIA's containers with a GPU, e.g.\n"
         "    docker run --gpus all -v $PWD:/w nvcr.io/nvidia/tritonserver:25.01-py3 \\\n"
         "        bash -c 'pip install /w && onestep export tensorrt --onnx /w/...'")


def _import_trt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise ExportError(WHERE) from e
    return trt


def gpu_compute_capability() -> str:
    """'9.0' for an H100, via the CUDA driver API (no torch needed)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise ExportError("no CUDA driver (libcuda.so.1): TensorRT engines are built on the GPU that runs them") from e
    if cuda.cuInit(0) != 0:
        raise ExportError("cuInit failed: no usable GPU")
    dev = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        raise ExportError("no CUDA device 0")
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return f"{major.value}.{minor.value}"


def engine_key(onnx_sha256: str, trt_version: str, compute_capability: str, precision: str,
               profile: tuple[int, int, int]) -> str:
    blob = json.dumps([onnx_sha256, trt_version, compute_capability, precision, list(profile)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_engine(onnx_path: str | Path, cache_dir: str | Path, precision: str = "fp16",
                 profile: tuple[int, int, int] = (1, 16, 64), timing_cache: str | Path | None = None,
                 workspace_gib: float = 4.0) -> dict:
    """Build (or reuse from the cache) an engine; returns its sidecar (with 'path')."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ExportError("precision must be fp32, fp16 or bf16")
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        raise ExportError(f"profile must satisfy 1 <= min <= opt <= max, got {profile}")
    onnx_path = Path(onnx_path)
    onnx_meta = read_sidecar(onnx_path)
    trt = _import_trt()
    cc = gpu_compute_capability()
    key = engine_key(onnx_meta["sha256"], trt.__version__, cc, precision, profile)
    cache_dir = Path(cache_dir)
    engine_path = cache_dir / f"{onnx_path.stem}-{precision}-{key}.plan"
    side = artifact_sidecar(engine_path)
    if engine_path.exists() and side.exists():
        meta = json.loads(side.read_text())
        if meta.get("engine_key") == key and sha256_file(engine_path) == meta.get("sha256"):
            return {**meta, "path": str(engine_path), "cache_hit": True}

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        prof.set_shape(t.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(prof)
    tc_path = Path(timing_cache) if timing_cache else cache_dir / "timing.cache"
    cache = config.create_timing_cache(tc_path.read_bytes() if tc_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the log above)")
    build_seconds = time.time() - t0
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_bytes(tc_path, bytes(config.get_timing_cache().serialize()))
    meta = {"artifact": "tensorrt-engine", "file": engine_path.name, "sha256": sha256_file(engine_path),
            "engine_key": key, "source_onnx": str(onnx_path), "source_onnx_sha256": onnx_meta["sha256"],
            "source_sha256": onnx_meta.get("source_sha256"), "method": onnx_meta.get("method"),
            "graph": onnx_meta.get("graph"), "precision": precision, "profile": {"min": lo, "opt": opt, "max": hi},
            "compute_capability": cc, "tensorrt_version": trt.__version__, "inputs": onnx_meta["inputs"],
            "outputs": onnx_meta["outputs"], "image_shape": onnx_meta.get("image_shape"),
            "num_classes": onnx_meta.get("num_classes"), "build_seconds": build_seconds, **stamp()}
    meta["parity"] = measure_engine_parity(engine_path, onnx_path, meta)
    atomic_write_json(side, meta)
    return {**meta, "path": str(engine_path), "cache_hit": False}


def load_engine(engine_path: str | Path):
    """Deserialize an engine after checking its integrity and that it was built for this TensorRT and GPU."""
    engine_path = Path(engine_path)
    side = artifact_sidecar(engine_path)
    if not engine_path.exists() or not side.exists():
        raise ExportError(f"{engine_path} or its sidecar is missing")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{side} is not valid JSON: {e}") from e
    if sha256_file(engine_path) != meta.get("sha256"):
        raise ExportError(f"{engine_path} does not match its sidecar's sha256: corrupt or replaced")
    trt = _import_trt()
    cc = gpu_compute_capability()
    if meta.get("tensorrt_version") != trt.__version__ or meta.get("compute_capability") != cc:
        raise ExportError(f"stale engine: built for TensorRT {meta.get('tensorrt_version')} on compute capability "
                          f"{meta.get('compute_capability')}, this is TensorRT {trt.__version__} on {cc}; rebuild")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize {engine_path}")
    return engine, meta


def measure_engine_parity(engine_path: Path, onnx_path: Path, meta: dict) -> dict:
    """Run the engine and onnxruntime (CPU) on the same seeded inputs; max abs error per batch size."""
    import numpy as np
    import onnxruntime as ort

    from serving.trt_runner import TensorRTRunner

    runner = TensorRTRunner(engine_path, check=False)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from onestep.noise import seeded_noise

    per = {}
    shape = tuple(meta["image_shape"])
    for n in sorted({meta["profile"]["min"], min(3, meta["profile"]["max"]), meta["profile"]["opt"]}):
        feeds = {"z" if meta["graph"] == "generator" else "x": seeded_noise(range(n), shape)}
        if meta["graph"] == "denoiser":
            feeds["sigma"] = np.geomspace(0.01, 40.0, n).astype(np.float32)
        if meta.get("num_classes"):
            feeds["labels"] = (np.arange(n) % meta["num_classes"]).astype(np.int64)
        ref = sess.run(None, feeds)[0]
        got = runner.run(feeds)
        per[str(n)] = float(np.abs(got - ref).max())
    return {"max_abs_err_vs_onnxruntime": max(per.values()), "per_batch": per}

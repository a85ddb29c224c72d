"""`onestep export triton`: a Triton model repository from exported artifacts.

config.pbtxt files are built as `ModelConfig` protobuf messages (Triton's own schema, shipped in
tritonclient) and printed with protobuf's text format, never from string templates. For each student:
- `<name>`        python backend, SEED[, LABEL] -> IMAGE uint8 (noise, model and post-processing inside);
                  loads in the bundled local server (python backend only) and in NVIDIA's container alike;
- `<name>_tensor` python backend running onnxruntime, z[, labels] -> image float32: the raw-tensor contract
                  of `<name>_onnx`, written beside it because the Triton bundled in nvidia-pytriton (where
                  the product runs and is measured locally) has only the python backend and cannot load
                  `<name>_onnx`; same inputs, outputs and batching, so a client can switch between the two;
- `<name>_onnx`   platform onnxruntime_onnx, z[, labels] -> image (NVIDIA's container only);
- `<name>_trt`    platform tensorrt_plan when an engine is given (NVIDIA's container with a GPU).
For a teacher: `<name>_<sampler><steps>` python-backend models, the same SEED/LABEL -> IMAGE contract served
by an N-step sampler, so student and teacher are compared through the same path.
`repository.json` at the root lists the models, which backends each needs, and their class names.

Device (`kind`): "cpu" gives every model a KIND_CPU instance group and the python-backend models onnxruntime's
CPU provider; "gpu" gives KIND_GPU instance groups and the python-backend models the providers
`CUDAExecutionProvider,CPUExecutionProvider`: each instance runs its network on the GPU Triton assigns it, and a
model whose providers do not fit its kind is refused here and fails to load in Triton (serving.engine).
The SEED[, LABEL] -> IMAGE models (student and teachers) are pure functions of their inputs, so their configs
enable Triton's response cache (`response_cache=False` leaves it out); it takes effect only on a server
started with a cache (`onestep serve --response-cache-mib`). The raw-tensor models never cache.

Every model gets dynamic batching with the queue delay `DEFAULT_MAX_QUEUE_DELAY_US` unless told otherwise
(the value comes from `python -m benchmarks.queue_delay`, see benchmarks/results/queue_delay.md), a queue
policy only when asked for (`max_queue_size` requests, requests waiting longer than `queue_timeout_us` are
rejected, clients may ask for a shorter timeout; off by default, see `DEFAULT_MAX_QUEUE_SIZE` for why) and
warm-up requests at batch 1 and at the maximum batch, so the first real request of either size does not pay
for first-call allocations.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from onestep.provenance import atomic_write_bytes, atomic_write_json, stamp

MODEL_PY = Path(__file__).resolve().parent.parent / "serving" / "triton_model.py"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")

# Dynamic batcher defaults (single source: the CLI and the benchmarks read them from here). The queue delay and
# the preferred sizes are the ones `python -m benchmarks.queue_delay` recommends (batch-1 latency and throughput
# at 1, 4 and 16 clients; benchmarks/results/queue_delay.md, measured on 2 CPU cores): no setting of 100, 500 or
# 1000 us, with or without preferred sizes 4,16, gave more images/s at 16 clients with an interval excluding 1x
# (179 images/s at zero delay), while 500 and 1000 us cost 15-25% of batch-1 latency at one client; with no wait
# the batcher still groups what is already queued (mean batch 8.8 at 16 clients). Re-run it on the serving
# machine (GPU: `--kind gpu` repositories) before changing these.
DEFAULT_MAX_QUEUE_DELAY_US = 0
DEFAULT_PREFERRED_BATCH_SIZES: tuple[int, ...] = ()  # plus the maximum batch
# Queue policy (bounded batcher queue, queue timeout): off by default. On the bundled Triton ANY
# default_queue_policy (a size bound alone, a timeout alone, or both) makes the dynamic batcher hold 8-12% of
# batch-1 requests for ~500 ms before they run, even with no queue delay and an idle server
# (benchmarks/results/queue_policy.md: p99 ~520 ms vs ~16 ms without). What still bounds the queue by default: the
# HTTP API's in-flight limit (`onestep serve --limit`) and Triton's ports bound to localhost. Set both values
# (`onestep export triton --max-queue-size/--queue-timeout-us`) on a Triton where `python -m benchmarks.queue_policy`
# shows no such wait.
DEFAULT_MAX_QUEUE_SIZE = 0  # 0: no bound; N: requests waiting in the batcher beyond N are rejected at once
DEFAULT_QUEUE_TIMEOUT_US = 0  # 0: never; T: a request queued longer than T is rejected (clients may ask less)
# onnxruntime execution providers of the python-backend models for each instance kind
DEFAULT_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider,CPUExecutionProvider"}


def _error(message: str) -> Exception:
    from exporters.onnx_export import ExportError  # lazily: this module is read by argument parsers, torch-free

    return ExportError(message)


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise _error("writing Triton configs needs tritonclient: pip install 'tritonclient[grpc]'") from e
    return model_config_pb2


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise _error(f"invalid model name {name!r}: use lowercase letters, digits, '_' or '-' (max 64)")
    return name


def _text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


@dataclass(frozen=True)
class Batching:
    """Dynamic batcher, queue policy and instances of every generated model."""

    max_batch: int = 64
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    preferred: tuple[int, ...] = DEFAULT_PREFERRED_BATCH_SIZES
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    queue_timeout_us: int = DEFAULT_QUEUE_TIMEOUT_US
    instances: int = 1
    kind: str = "cpu"

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue_delay_us < 0 or self.max_queue_size < 0 or self.queue_timeout_us < 0:
            raise _error("max batch must be >= 1; queue delay, queue size and queue timeout >= 0")
        if self.kind not in DEFAULT_PROVIDERS:
            raise _error(f"instance kind must be one of {', '.join(DEFAULT_PROVIDERS)}, not {self.kind!r}")


def _common(pb, cfg, b: Batching, max_batch: int | None = None, kind: str | None = None):
    mb = b.max_batch if max_batch is None else max_batch
    cfg.max_batch_size = mb
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = b.max_queue_delay_us
    db.preferred_batch_size.extend(sorted({p for p in b.preferred if 1 < p < mb} | ({mb} if mb > 1 else set())))
    if b.max_queue_size or b.queue_timeout_us:  # no policy at all otherwise (see DEFAULT_MAX_QUEUE_SIZE)
        q = db.default_queue_policy
        q.timeout_action = pb.ModelQueuePolicy.REJECT
        q.default_timeout_microseconds = b.queue_timeout_us
        q.allow_timeout_override = True
        q.max_queue_size = b.max_queue_size
    g = cfg.instance_group.add()
    g.count = b.instances
    g.kind = pb.ModelInstanceGroup.KIND_GPU if (kind or b.kind) == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    cfg.version_policy.latest.num_versions = 1


def _warmup(pb, cfg, inputs: list[tuple[str, int, list[int]]], batches) -> None:
    """Warm-up requests with zero inputs, one per batch size (each instance runs them before it is ready)."""
    for bs in sorted(set(batches)):
        w = cfg.model_warmup.add(name=f"zeros_batch{bs}", batch_size=bs)
        for name, dtype, dims in inputs:
            w.inputs[name].data_type = dtype
            w.inputs[name].dims.extend(dims)
            w.inputs[name].zero_data = True


def seed_label_config(pb, name: str, num_classes: int, shape, params: dict, b: Batching,
                      response_cache: bool = False):
    cfg = pb.ModelConfig(name=name, backend="python")
    _common(pb, cfg, b)
    if response_cache:  # (seed, label) -> image is deterministic: a repeated request is a cache hit
        cfg.response_cache.enable = True
    cfg.input.add(name="SEED", data_type=pb.TYPE_INT64, dims=[1])
    if num_classes:
        cfg.input.add(name="LABEL", data_type=pb.TYPE_INT64, dims=[1])
    cfg.output.add(name="IMAGE", data_type=pb.TYPE_UINT8, dims=list(shape))
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    # EXECUTION_ENV_PATH etc. are left to the deployment; warm-up runs seed 0 (label 0) at batch 1 and max batch
    _warmup(pb, cfg, [(i.name, i.data_type, list(i.dims)) for i in cfg.input], (1, b.max_batch))
    return cfg


def tensor_config(pb, name: str, meta: dict, b: Batching, platform: str | None = None, backend: str | None = None,
                  params: dict | None = None, max_batch: int | None = None, kind: str | None = None):
    """z[, labels] -> image with the graph's own tensor names: a native platform (onnxruntime_onnx,
    tensorrt_plan) or the python backend (`backend="python"`, with `params` for the model)."""
    cfg = pb.ModelConfig(name=name, platform=platform or "", backend=backend or "")
    _common(pb, cfg, b, max_batch, kind)
    types = {"float32": pb.TYPE_FP32, "int64": pb.TYPE_INT64, "float16": pb.TYPE_FP16}
    warm = []
    for spec, target in ((meta["inputs"], cfg.input), (meta["outputs"], cfg.output)):
        for t in spec:
            dims = list(t["shape"][1:])
            if dims:
                target.add(name=t["name"], data_type=types[t["dtype"]], dims=dims)
            else:  # a per-sample scalar (labels, sigma): [1] on the wire, [] in the model
                io = target.add(name=t["name"], data_type=types[t["dtype"]], dims=[1])
                io.reshape.shape.extend([])
                io.reshape.SetInParent()
            if target is cfg.input:
                warm.append((t["name"], types[t["dtype"]], dims or [1]))
    for k, v in (params or {}).items():
        cfg.parameters[k].string_value = str(v)
    _warmup(pb, cfg, warm, (1, cfg.max_batch_size))
    return cfg


def _class_names(meta: dict, num_classes: int) -> list[str]:
    """The class names an ONNX sidecar records (`onestep export onnx`); `class k` for sidecars written before
    sidecars carried names."""
    names = meta.get("class_names")
    if names is None:
        return [f"class {k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise _error(f"the sidecar lists {len(names)} class names for {num_classes} classes")
    return [str(x) for x in names]


def _write_model(root: Path, name: str, cfg, files: dict[str, Path | bytes]) -> None:
    mdir = root / name
    vdir = mdir / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    for fname, src in files.items():
        if isinstance(src, bytes):
            atomic_write_bytes(vdir / fname, src)
        else:
            shutil.copyfile(src, vdir / fname)
    atomic_write_bytes(mdir / "config.pbtxt", _text(cfg).encode())


def build_repository(out_dir: str | Path, student_onnx: str | Path | None = None, name: str = "onestep",
                     teacher_onnx: str | Path | None = None, teacher_steps: tuple[tuple[str, int], ...] = (("heun", 18),),
                     engine: str | Path | None = None, max_batch: int = 64,
                     max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, instances: int = 1, kind: str = "cpu",
                     onnx_providers: str | None = None, intra_op_threads: int = 0,
                     with_onnx_platform: bool = True, *, intra_op_spinning: bool = True, preferred_batch_sizes=DEFAULT_PREFERRED_BATCH_SIZES,
                     max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE, queue_timeout_us: int = DEFAULT_QUEUE_TIMEOUT_US,
                     with_tensor_model: bool = True, response_cache: bool = True) -> dict:
    """`onnx_providers`: comma list for the python-backend models (default: DEFAULT_PROVIDERS[kind]);
    `intra_op_spinning`: onnxruntime's intra-op threads busy-wait between operators (on, its default) or sleep;
    `response_cache`: enable Triton's response cache in the SEED[, LABEL] -> IMAGE models' configs."""
    b = Batching(max_batch, max_queue_delay_us, tuple(preferred_batch_sizes), max_queue_size, queue_timeout_us,
                 instances, kind)
    from serving.engine import ProviderError, check_placement

    onnx_providers = ",".join(x.strip() for x in (onnx_providers or DEFAULT_PROVIDERS[kind]).split(",") if x.strip())
    try:
        check_placement(kind, onnx_providers.split(","))
    except ProviderError as e:
        raise _error(f"--kind {kind} with --providers {onnx_providers}: {e}") from e
    from exporters.onnx_export import artifact_sidecar, read_sidecar

    pb = _pb()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"models": {}, **stamp()}
    model_py = MODEL_PY.read_bytes()
    if student_onnx is not None:
        check_name(name)
        meta = read_sidecar(student_onnx)
        if meta["graph"] != "generator":
            raise _error(f"{student_onnx} is a {meta['graph']} graph; the student must be a generator graph")
        shape, n_cls = meta["image_shape"], int(meta["num_classes"])
        names = _class_names(meta, n_cls)
        params = {"mode": "generator", "onnx_file": "model.onnx", "image_shape": ",".join(map(str, shape)),
                  "num_classes": n_cls, "providers": onnx_providers, "intra_op_threads": intra_op_threads,
                  "intra_op_spinning": int(intra_op_spinning), "source_sha256": meta["source_sha256"], "onnx_sha256": meta["sha256"]}
        cfg = seed_label_config(pb, name, n_cls, shape, params, b, response_cache)
        _write_model(root, name, cfg, {"model.py": model_py, "model.onnx": Path(student_onnx),
                                       "model.onnx.json": artifact_sidecar(student_onnx)})
        manifest["models"][name] = {"role": "student", "backend": "python", "local": True, "num_classes": n_cls,
                                    "class_names": names, "image_shape": shape, "nfe": 1,
                                    "method": meta.get("method"), "onnx_sha256": meta["sha256"],
                                    "response_cache": response_cache}
        if with_tensor_model:  # the raw-tensor contract on the python backend (see the module docstring)
            tparams = {**params, "mode": "tensor"}
            cfg = tensor_config(pb, f"{name}_tensor", meta, b, backend="python", params=tparams)
            _write_model(root, f"{name}_tensor", cfg, {"model.py": model_py, "model.onnx": Path(student_onnx),
                                                       "model.onnx.json": artifact_sidecar(student_onnx)})
            # "python-tensor": runs on the python backend, but speaks z[, labels] -> image, not SEED -> IMAGE
            manifest["models"][f"{name}_tensor"] = {"role": "student-tensor", "backend": "python-tensor",
                                                    "local": True, "num_classes": n_cls, "class_names": names,
                                                    "image_shape": shape,
                                                    "nfe": 1, "inputs": [t["name"] for t in meta["inputs"]],
                                                    "outputs": [t["name"] for t in meta["outputs"]]}
        if with_onnx_platform:
            cfg = tensor_config(pb, f"{name}_onnx", meta, b, platform="onnxruntime_onnx")
            _write_model(root, f"{name}_onnx", cfg, {"model.onnx": Path(student_onnx)})
            manifest["models"][f"{name}_onnx"] = {"role": "student-tensor", "backend": "onnxruntime", "local": False,
                                                  "num_classes": n_cls, "class_names": names, "image_shape": shape,
                                                  "nfe": 1}
        if engine is not None:
            emeta = json.loads(artifact_sidecar(engine).read_text())
            cfg = tensor_config(pb, f"{name}_trt", emeta, b, platform="tensorrt_plan",
                                max_batch=min(max_batch, emeta["profile"]["max"]), kind="gpu")
            _write_model(root, f"{name}_trt", cfg, {"model.plan": Path(engine)})
            manifest["models"][f"{name}_trt"] = {"role": "student-tensor", "backend": "tensorrt", "local": False,
                                                 "num_classes": n_cls, "class_names": names, "image_shape": shape,
                                                 "nfe": 1}
    if teacher_onnx is not None:
        meta = read_sidecar(teacher_onnx)
        if meta["graph"] != "denoiser":
            raise _error(f"{teacher_onnx} is a {meta['graph']} graph; the teacher must be a denoiser graph")
        shape, n_cls = meta["image_shape"], int(meta["num_classes"])
        names = _class_names(meta, n_cls)
        from onestep.samplers import nfe

        for sampler, steps in teacher_steps:
            tname = check_name(f"teacher_{sampler}{steps}")
            params = {"mode": "teacher", "onnx_file": "model.onnx", "image_shape": ",".join(map(str, shape)),
                      "num_classes": n_cls, "providers": onnx_providers, "intra_op_threads": intra_op_threads,
                      "intra_op_spinning": int(intra_op_spinning), "sampler": sampler, "steps": steps, "schedule": "karras", "sigma_min": meta["sigma_min"],
                      "sigma_max": meta["sigma_max"], "source_sha256": meta["source_sha256"],
                      "onnx_sha256": meta["sha256"]}
            cfg = seed_label_config(pb, tname, n_cls, shape, params, b, response_cache)
            _write_model(root, tname, cfg, {"model.py": model_py, "model.onnx": Path(teacher_onnx),
                                            "model.onnx.json": artifact_sidecar(teacher_onnx)})
            manifest["models"][tname] = {"role": "teacher", "backend": "python", "local": True, "num_classes": n_cls,
                                         "class_names": names, "image_shape": shape, "nfe": nfe(sampler, steps),
                                         "sampler": sampler, "steps": steps, "response_cache": response_cache}
    if not manifest["models"]:
        raise _error("nothing to export: give a student ONNX and/or a teacher ONNX")
    manifest["batching"] = {"max_batch": b.max_batch, "max_queue_delay_us": b.max_queue_delay_us,
                            "preferred_batch_sizes": list(b.preferred), "max_queue_size": b.max_queue_size,
                            "queue_timeout_us": b.queue_timeout_us, "instances": b.instances, "kind": b.kind,
                            "providers": onnx_providers, "intra_op_spinning": bool(intra_op_spinning)}
    atomic_write_json(root / "repository.json", manifest)
    return manifest


def parse_config(path: str | Path):
    """Parse a config.pbtxt with Triton's schema (raises on any unknown field or bad value)."""
    from google.protobuf import text_format

    pb = _pb()
    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())

"""`onestep export triton`: a Triton model repository from exported artifacts.

config.pbtxt files are built as `ModelConfig` protobuf messages (Triton's own schema, shipped in
tritonclient) and printed with protobuf's text format, never from string templates. For each student:
- `<name>`        python backend, SEED[, LABEL] -> IMAGE uint8 (noise, model and post-processing inside);
                  loads in the bundled local server (python backend only) and in NVIDIA's container alike;
- `<name>_onnx`   platform onnxruntime_onnx, z[, labels] -> image (production container only);
- `<name>_trt`    platform tensorrt_plan when an engine is given (production container with a GPU).
For a teacher: `<name>_<sampler><steps>` python-backend models, the same SEED/LABEL -> IMAGE contract served
by an N-step sampler, so student and teacher are compared through the same path.
`repository.json` at the root lists the models and which backends each needs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from exporters.onnx_export import ExportError, artifact_sidecar, read_sidecar
from onestep.provenance import atomic_write_bytes, atomic_write_json, stamp

MODEL_PY = Path(__file__).resolve().parent.parent / "serving" / "triton_model.py"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ExportError("writing Triton configs needs tritonclient: pip install 'tritonclient[grpc]'") from e
    return model_config_pb2


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ExportError(f"invalid model name {name!r}: use lowercase letters, digits, '_' or '-' (max 64)")
    return name


def _text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def _common(pb, cfg, max_batch: int, max_queue_delay_us: int, instances: int, kind: str, preferred=()):
    cfg.max_batch_size = max_batch
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(p for p in preferred if p <= max_batch)
    g = cfg.instance_group.add()
    g.count = instances
    g.kind = pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    cfg.version_policy.latest.num_versions = 1


def seed_label_config(pb, name: str, num_classes: int, shape, params: dict, max_batch: int, max_queue_delay_us: int,
                      instances: int, kind: str):
    cfg = pb.ModelConfig(name=name, backend="python")
    _common(pb, cfg, max_batch, max_queue_delay_us, instances, kind, preferred=(8, 32, max_batch))
    cfg.input.add(name="SEED", data_type=pb.TYPE_INT64, dims=[1])
    if num_classes:
        cfg.input.add(name="LABEL", data_type=pb.TYPE_INT64, dims=[1])
    cfg.output.add(name="IMAGE", data_type=pb.TYPE_UINT8, dims=list(shape))
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    # EXECUTION_ENV_PATH etc. are left to the deployment; warm-up runs seed 0 (label 0) once per instance
    w = cfg.model_warmup.add(name="seed0", batch_size=1)
    w.inputs["SEED"].data_type = pb.TYPE_INT64
    w.inputs["SEED"].dims.extend([1])
    w.inputs["SEED"].zero_data = True
    if num_classes:
        w.inputs["LABEL"].data_type = pb.TYPE_INT64
        w.inputs["LABEL"].dims.extend([1])
        w.inputs["LABEL"].zero_data = True
    return cfg


def tensor_config(pb, name: str, platform: str, meta: dict, max_batch: int, max_queue_delay_us: int,
                  instances: int, kind: str):
    cfg = pb.ModelConfig(name=name, platform=platform)
    _common(pb, cfg, max_batch, max_queue_delay_us, instances, kind, preferred=(8, 32, max_batch))
    types = {"float32": pb.TYPE_FP32, "int64": pb.TYPE_INT64, "float16": pb.TYPE_FP16}
    for spec, target in ((meta["inputs"], cfg.input), (meta["outputs"], cfg.output)):
        for t in spec:
            dims = list(t["shape"][1:])
            if dims:
                target.add(name=t["name"], data_type=types[t["dtype"]], dims=dims)
            else:  # a per-sample scalar (labels, sigma): [1] on the wire, [] in the model
                io = target.add(name=t["name"], data_type=types[t["dtype"]], dims=[1])
                io.reshape.shape.extend([])
                io.reshape.SetInParent()
    return cfg


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
                     engine: str | Path | None = None, max_batch: int = 64, max_queue_delay_us: int = 2000,
                     instances: int = 1, kind: str = "cpu", onnx_providers: str = "CPUExecutionProvider",
                     intra_op_threads: int = 0, with_onnx_platform: bool = True) -> dict:
    pb = _pb()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"models": {}, **stamp()}
    model_py = MODEL_PY.read_bytes()
    if student_onnx is not None:
        check_name(name)
        meta = read_sidecar(student_onnx)
        if meta["graph"] != "generator":
            raise ExportError(f"{student_onnx} is a {meta['graph']} graph; the student must be a generator graph")
        shape, n_cls = meta["image_shape"], int(meta["num_classes"])
        params = {"mode": "generator", "onnx_file": "model.onnx", "image_shape": ",".join(map(str, shape)),
                  "num_classes": n_cls, "providers": onnx_providers, "intra_op_threads": intra_op_threads,
                  "source_sha256": meta["source_sha256"], "onnx_sha256": meta["sha256"]}
        cfg = seed_label_config(pb, name, n_cls, shape, params, max_batch, max_queue_delay_us, instances, kind)
        _write_model(root, name, cfg, {"model.py": model_py, "model.onnx": Path(student_onnx),
                                       "model.onnx.json": artifact_sidecar(student_onnx)})
        manifest["models"][name] = {"role": "student", "backend": "python", "local": True, "num_classes": n_cls,
                                    "image_shape": shape, "nfe": 1, "method": meta.get("method"),
                                    "onnx_sha256": meta["sha256"]}
        if with_onnx_platform:
            cfg = tensor_config(pb, f"{name}_onnx", "onnxruntime_onnx", meta, max_batch, max_queue_delay_us,
                                instances, kind)
            _write_model(root, f"{name}_onnx", cfg, {"model.onnx": Path(student_onnx)})
            manifest["models"][f"{name}_onnx"] = {"role": "student-tensor", "backend": "onnxruntime", "local": False,
                                                  "num_classes": n_cls, "image_shape": shape, "nfe": 1}
        if engine is not None:
            emeta = json.loads(artifact_sidecar(engine).read_text())
            cfg = tensor_config(pb, f"{name}_trt", "tensorrt_plan", emeta, min(max_batch, emeta["profile"]["max"]),
                                max_queue_delay_us, instances, "gpu")
            _write_model(root, f"{name}_trt", cfg, {"model.plan": Path(engine)})
            manifest["models"][f"{name}_trt"] = {"role": "student-tensor", "backend": "tensorrt", "local": False,
                                                 "num_classes": n_cls, "image_shape": shape, "nfe": 1}
    if teacher_onnx is not None:
        meta = read_sidecar(teacher_onnx)
        if meta["graph"] != "denoiser":
            raise ExportError(f"{teacher_onnx} is a {meta['graph']} graph; the teacher must be a denoiser graph")
        shape, n_cls = meta["image_shape"], int(meta["num_classes"])
        from onestep.samplers import nfe

        for sampler, steps in teacher_steps:
            tname = check_name(f"teacher_{sampler}{steps}")
            params = {"mode": "teacher", "onnx_file": "model.onnx", "image_shape": ",".join(map(str, shape)),
                      "num_classes": n_cls, "providers": onnx_providers, "intra_op_threads": intra_op_threads,
                      "sampler": sampler, "steps": steps, "schedule": "karras", "sigma_min": meta["sigma_min"],
                      "sigma_max": meta["sigma_max"], "source_sha256": meta["source_sha256"],
                      "onnx_sha256": meta["sha256"]}
            cfg = seed_label_config(pb, tname, n_cls, shape, params, max_batch, max_queue_delay_us, instances, kind)
            _write_model(root, tname, cfg, {"model.py": model_py, "model.onnx": Path(teacher_onnx),
                                            "model.onnx.json": artifact_sidecar(teacher_onnx)})
            manifest["models"][tname] = {"role": "teacher", "backend": "python", "local": True, "num_classes": n_cls,
                                         "image_shape": shape, "nfe": nfe(sampler, steps), "sampler": sampler,
                                         "steps": steps}
    if not manifest["models"]:
        raise ExportError("nothing to export: give a student ONNX and/or a teacher ONNX")
    atomic_write_json(root / "repository.json", manifest)
    return manifest


def parse_config(path: str | Path):
    """Parse a config.pbtxt with Triton's schema (raises on any unknown field or bad value)."""
    from google.protobuf import text_format

    pb = _pb()
    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())

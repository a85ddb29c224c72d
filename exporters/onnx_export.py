"""`onestep export onnx`: a student as ONE graph (z, labels) -> image in [-1, 1], or a teacher's denoiser
D(x, sigma, labels) -> x0_hat for served N-step baselines. Dynamic batch axis, one self-contained file,
`onnx.checker` clean, parity against PyTorch measured on onnxruntime's CPU provider at several batch sizes
and recorded in a JSON sidecar; the export fails above the tolerance.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onestep.checkpoint import DENOISER_KINDS, CheckpointError, class_names, image_shape, load_model, read_metadata
from onestep.noise import seeded_noise
from onestep.provenance import atomic_write_json, sha256_file, stamp

DEFAULT_OPSET = 18
PARITY_BATCHES = (1, 3, 8)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class ExportError(RuntimeError):
    """An export failed or an artifact is missing, corrupt or stale; the message says which."""


def artifact_sidecar(path: str | Path) -> Path:
    """model.onnx -> model.onnx.json, model.plan -> model.plan.json (never clashes with a checkpoint's .json)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class _Graph(nn.Module):
    """Holds the wrapped net, cast to the export precision; inputs and outputs stay float32 on the wire."""

    def __init__(self, net: nn.Module, precision: str = "fp32"):
        super().__init__()
        self.net = net
        self.dtype = {"fp16": torch.float16, "fp64": torch.float64}.get(precision, torch.float32)
        if precision == "fp16":
            self.net.half()
        elif precision == "fp64":  # the reference that measures PyTorch's own fp32 rounding
            self.net.double()


class GeneratorGraph(_Graph):
    """(z, labels) -> G(z, labels) clamped to [-1, 1]: the image a server returns (before uint8)."""

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z.to(self.dtype), labels).float().clamp(-1.0, 1.0)


class DenoiserGraph(_Graph):
    """(x, sigma, labels) -> D(x, sigma, labels): one step of a multi-step sampler."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x.to(self.dtype), sigma, labels).float()


def _example_inputs(graph: str, shape, n: int, num_classes: int, seed0: int = 0):
    z = torch.from_numpy(seeded_noise(range(seed0, seed0 + n), shape))
    labels = torch.arange(n, dtype=torch.int64) % num_classes if num_classes else None
    if graph == "generator":
        return (z, labels) if num_classes else (z,)
    sigma = torch.from_numpy(np.geomspace(0.01, 40.0, n).astype(np.float32))
    return (z * sigma.reshape(-1, 1, 1, 1).clamp(min=1.0), sigma, labels) if num_classes else \
        (z * sigma.reshape(-1, 1, 1, 1).clamp(min=1.0), sigma)


def _names(graph: str, num_classes: int):
    inputs = ["z"] if graph == "generator" else ["x", "sigma"]
    if num_classes:
        inputs.append("labels")
    return inputs, ["image" if graph == "generator" else "x0_hat"]


def measure_parity(onnx_path: Path, module: nn.Module, graph: str, shape, num_classes: int,
                   batches=PARITY_BATCHES) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    per_batch = {}
    for n in batches:
        args = _example_inputs(graph, shape, n, num_classes, seed0=100 + n)
        with torch.no_grad():
            ref = module(*args).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in zip(in_names, args)})[0]
        if got.shape != ref.shape:
            raise ExportError(f"onnxruntime output shape {got.shape} != PyTorch {ref.shape} at batch {n}")
        per_batch[str(n)] = float(np.abs(got - ref).max())
    return {"max_abs_err": max(per_batch.values()), "per_batch": per_batch, "provider": "CPUExecutionProvider"}


def _max_diff(a: nn.Module, b: nn.Module, graph: str, shape, num_classes: int, batches=PARITY_BATCHES) -> float:
    out = 0.0
    with torch.no_grad():
        for n in batches:
            args = _example_inputs(graph, shape, n, num_classes, seed0=100 + n)
            out = max(out, float((a(*args).double() - b(*args).double()).abs().max()))
    return out


def _fp64_floor(model_path, ref_module: nn.Module, graph: str, shape, num_classes: int) -> float | None:
    """max|PyTorch fp32 - PyTorch fp64| on the parity inputs, or None for a net that cannot run in float64
    (one that makes float32 tensors of its own inside, e.g. SFERD's unrolled latent sampler)."""
    ref64 = (GeneratorGraph if graph == "generator" else DenoiserGraph)(load_model(model_path)[0], "fp64").eval()
    try:
        return _max_diff(ref_module, ref64, graph, shape, num_classes)
    except RuntimeError:  # dtype mismatch inside the net
        return None


def export_onnx(model_path: str | Path, out_path: str | Path, graph: str = "auto", precision: str = "fp32",
                opset: int = DEFAULT_OPSET, tolerance: float | None = None, simplify: bool = False,
                names: list[str] | None = None) -> dict:
    """Export, check, measure parity; write `<out>.onnx` and `<out>.json`. Returns the sidecar.

    The sidecar's `class_names` come from the checkpoint's metadata (`onestep.checkpoint.class_names`) unless
    `names` gives them (one per class)."""
    import onnx

    if precision not in TOLERANCE:
        raise ExportError(f"precision must be one of {sorted(TOLERANCE)}")
    if opset < 17:
        raise ExportError("opset 17 or newer is required")
    model_path, out_path = Path(model_path), Path(out_path)
    model, meta = load_model(model_path)
    spec = meta["model"]
    if graph == "auto":
        graph = "denoiser" if spec["kind"] in DENOISER_KINDS else "generator"
    num_classes = int(getattr(model, "num_classes", 0))
    try:
        labels_named = class_names({**meta, "class_names": names} if names is not None else meta, num_classes)
    except CheckpointError as e:  # a list of names that does not fit the model
        raise ExportError(f"{model_path}: {e}") from e
    shape = image_shape(spec)
    wrapper = (GeneratorGraph if graph == "generator" else DenoiserGraph)(model, precision).eval()
    ref_module = (GeneratorGraph if graph == "generator" else DenoiserGraph)(load_model(model_path)[0], "fp32").eval()
    inputs, outputs = _names(graph, num_classes)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = {name: {0: batch} for name in inputs}
    example = _example_inputs(graph, shape, 2, num_classes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    t0 = time.time()
    try:
        prog = torch.onnx.export(wrapper, example, dynamo=True, input_names=inputs, output_names=outputs,
                                 opset_version=opset, dynamic_shapes=dyn, optimize=True, verify=False)
        prog.save(str(tmp), external_data=False)
    except Exception as e:  # the exporter raises many error types; keep the message
        if tmp.exists():
            tmp.unlink()
        raise ExportError(f"torch.onnx.export failed for {model_path}: {e}") from e
    export_seconds = time.time() - t0
    proto = onnx.load(str(tmp))
    if simplify:
        try:
            import onnxsim

            proto, ok = onnxsim.simplify(proto)
            if not ok:
                raise ExportError("onnxsim could not validate the simplified graph")
        except ImportError as e:
            raise ExportError("--simplify needs `pip install onnxsim`") from e
    proto.producer_name = "onestep"
    meta_props = {"onestep.graph": graph, "onestep.source_sha256": meta.get("sha256", ""),
                  "onestep.precision": precision}
    for k, v in meta_props.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, str(v)
    if proto.ByteSize() > 2_000_000_000:
        raise ExportError("model over 2 GB: external data would be required")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    tol = tolerance if tolerance is not None else TOLERANCE[precision]
    try:
        parity = measure_parity(tmp, ref_module, graph, shape, num_classes)
        # PyTorch fp32 against a float64 run of the same net: the rounding floor of the model itself. Nets that
        # amplify rounding (an eps-prediction teacher read at sigma ~ 157 gives x0 = x - sigma * eps_hat) get a
        # tolerance of twice that floor, i.e. ONNX must be as accurate as PyTorch is, never less.
        parity["pytorch_fp32_vs_fp64"] = _fp64_floor(model_path, ref_module, graph, shape, num_classes)
    except Exception:
        tmp.unlink()
        raise
    if tolerance is None and precision == "fp32" and parity["pytorch_fp32_vs_fp64"] is not None:
        tol = max(tol, 2 * parity["pytorch_fp32_vs_fp64"])
    parity["tolerance"] = tol
    if not parity["max_abs_err"] <= tol:
        tmp.unlink()
        raise ExportError(f"ONNX parity error {parity['max_abs_err']:.3g} exceeds tolerance {tol:g} "
                          f"({precision}); per batch {parity['per_batch']}")
    tmp.replace(out_path)

    def io(vs):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in vs]

    sidecar = {
        "artifact": "onnx", "file": out_path.name, "sha256": sha256_file(out_path),
        "source": str(model_path), "source_sha256": meta.get("sha256") or sha256_file(model_path),
        "method": meta.get("method"), "graph": graph, "opset": opset, "precision": precision,
        "inputs": io(proto.graph.input), "outputs": io(proto.graph.output), "image_shape": list(shape),
        "num_classes": num_classes, "class_names": labels_named, "sigma_g": spec.get("sigma_g"),
        "sigma_min": getattr(model, "sigma_min", None) if graph == "denoiser" else None,
        "sigma_max": getattr(model, "sigma_max", None) if graph == "denoiser" else None,
        "output_range": [-1.0, 1.0] if graph == "generator" else None,
        "parity": parity, "export_seconds": export_seconds, "simplified": simplify, **stamp(),
    }
    atomic_write_json(artifact_sidecar(out_path), sidecar)
    return sidecar


def read_sidecar(onnx_path: str | Path, verify: bool = True) -> dict:
    import json

    onnx_path = Path(onnx_path)
    side = artifact_sidecar(onnx_path)
    if not onnx_path.exists():
        raise ExportError(f"{onnx_path} does not exist")
    if not side.exists():
        raise ExportError(f"{onnx_path} has no sidecar {side.name}; re-export it with `onestep export onnx`")
    meta = json.loads(side.read_text())
    if verify and sha256_file(onnx_path) != meta.get("sha256"):
        raise ExportError(f"{onnx_path} does not match the sha256 in {side.name}: corrupt or replaced")
    return meta


__all__ = ["export_onnx", "read_sidecar", "ExportError", "read_metadata"]

"""Triton python-backend model (copied as `model.py` into each version folder of a generated repository).

Runs in Triton's python-backend stub on numpy + onnxruntime (no torch). Two modes, set by the model's
config parameters:
- generator: SEED[, LABEL] -> IMAGE uint8, one network evaluation (the one-step student);
- teacher:   SEED[, LABEL] -> IMAGE uint8, an N-step Euler/Heun sampler around the teacher's denoiser graph,
  the multi-step baseline served the same way;
- tensor:    z[, labels] -> image float32 with the generator graph's own tensor names: the raw-tensor contract
  of the native `<name>_onnx` model, served by the python backend (the only one in nvidia-pytriton's Triton).
Seeds become noise through `onestep.noise.seeded_noise` (one generator per sample), so an image depends only
on its (seed, label), never on what else the dynamic batcher put in the batch.

Device: the `providers` parameter (onnxruntime execution providers) and the instance group must agree
(`serving.engine.check_placement`): a KIND_GPU instance runs its network on the CUDA provider, on the GPU
Triton gave it (`model_instance_device_id`), through I/O binding; a KIND_CPU instance on the CPU. A model
that cannot run where its config says fails to load (Triton reports the error), it never falls back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests, docs)
    pb_utils = None


def instance_device(args: dict, providers: list[str]) -> int:
    """The GPU this instance runs on (Triton's `model_instance_device_id` for a KIND_GPU instance), 0 on the
    CPU; raises when the providers do not fit the instance's kind."""
    from serving.engine import check_placement

    kind = args.get("model_instance_kind", "CPU")
    check_placement(kind, providers)
    return int(args["model_instance_device_id"]) if kind.upper() == "GPU" else 0


class TritonPythonModel:
    def initialize(self, args):
        from serving.engine import ImageEngine

        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        providers = [x.strip() for x in p.get("providers", "CPUExecutionProvider").split(",") if x.strip()]
        device_id = instance_device(args, providers)
        self.engine = ImageEngine(version_dir / p["onnx_file"], providers, p.get("sampler", "heun"),
                                  int(p.get("steps", "1")), int(p.get("intra_op_threads", "0")), device_id=device_id,
                                  intra_op_spinning=p.get("intra_op_spinning", "1") != "0")
        if pb_utils is not None and hasattr(pb_utils, "Logger"):
            where = f"GPU {device_id}" if self.engine.device == "cuda" else "CPU"
            pb_utils.Logger.log_info(f"{args.get('model_instance_name', cfg.get('name'))}: onnxruntime on {where} "
                                     f"({', '.join(self.engine.providers)}, I/O binding "
                                     f"{'on' if self.engine.io_binding else 'off'})")
        self.num_classes = self.engine.num_classes
        self.mode = p.get("mode", "generator")
        if self.mode == "tensor":
            meta = self.engine.meta
            self.z_name = meta["inputs"][0]["name"]
            self.label_name = meta["inputs"][1]["name"] if len(meta["inputs"]) > 1 else None
            self.out_name = meta["outputs"][0]["name"]

    def _generate(self, seeds: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        return self.engine.generate(seeds.tolist(), labels)

    def _validate(self, request):
        seeds = pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy().reshape(-1).astype(np.int64)
        if seeds.min() < 0:
            raise ValueError("SEED must be non-negative")
        labels = None
        if self.num_classes:
            t = pb_utils.get_input_tensor_by_name(request, "LABEL")
            if t is None:
                raise ValueError(f"LABEL is required (class-conditional model, {self.num_classes} classes)")
            labels = t.as_numpy().reshape(-1).astype(np.int64)
            if len(labels) != len(seeds):
                raise ValueError("SEED and LABEL must have the same batch size")
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"LABEL must lie in [0, {self.num_classes - 1}]")
        return seeds, labels

    def _validate_tensor(self, request):
        z = pb_utils.get_input_tensor_by_name(request, self.z_name).as_numpy()
        if z.ndim != 1 + len(self.engine.shape) or tuple(z.shape[1:]) != self.engine.shape:
            raise ValueError(f"{self.z_name} must have shape [batch, {', '.join(map(str, self.engine.shape))}]")
        z = np.ascontiguousarray(z, dtype=np.float32)
        labels = None
        if self.label_name:
            t = pb_utils.get_input_tensor_by_name(request, self.label_name)
            if t is None:
                raise ValueError(f"{self.label_name} is required (class-conditional model)")
            labels = self.engine.check_labels(t.as_numpy(), len(z))
        return z, labels

    @staticmethod
    def _batched(requests, validate, run, output):
        """Validate each request on its own (a bad one fails alone, its message to that client only), run all
        good ones as ONE batch, and split the batch back into one response per request.
        validate(request) -> (inputs, labels); run(inputs, labels) -> batch; output(rows) -> pb_utils.Tensor."""
        parsed, responses = [], [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                parsed.append((i, *validate(r)))
            except Exception as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        if parsed:
            inputs = np.concatenate([x for _, x, _ in parsed])
            labels = np.concatenate([lab for _, _, lab in parsed]) if parsed[0][2] is not None else None
            try:
                out = run(inputs, labels)
            except Exception as e:
                for i, _, _ in parsed:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {e}"))
                return responses
            start = 0
            for i, x, _ in parsed:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[output(out[start:start + len(x)])])
                start += len(x)
        return responses

    def execute(self, requests):
        if self.mode == "tensor":  # z[, labels] -> image floats
            return self._batched(requests, self._validate_tensor, self.engine.model_output,
                                 lambda rows: pb_utils.Tensor(self.out_name, np.ascontiguousarray(rows, np.float32)))
        return self._batched(requests, self._validate, self._generate, lambda rows: pb_utils.Tensor("IMAGE", rows))

    def finalize(self):
        self.engine = None

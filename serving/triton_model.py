"""Triton python-backend model (copied as `model.py` into each version folder of a generated repository).

Runs in Triton's python-backend stub on numpy + onnxruntime (no torch). Two modes, set by the model's
config parameters:
- generator: SEED[, LABEL] -> IMAGE uint8, one network evaluation (the one-step student);
- teacher:   SEED[, LABEL] -> IMAGE uint8, an N-step Euler/Heun sampler around the teacher's denoiser graph,
  the multi-step baseline served the same way.
Seeds become noise through `onestep.noise.seeded_noise` (one generator per sample), so an image depends only
on its (seed, label), never on what else the dynamic batcher put in the batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests, docs)
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.mode = p["mode"]
        self.shape = tuple(int(d) for d in p["image_shape"].split(","))
        self.num_classes = int(p.get("num_classes", "0"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        providers = [x for x in p.get("providers", "CPUExecutionProvider").split(",") if x]
        available = ort.get_available_providers()
        providers = [x for x in providers if x in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        threads = int(p.get("intra_op_threads", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(version_dir / p["onnx_file"]), sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if self.mode == "teacher":
            from onestep.samplers import SAMPLERS, make_sigmas

            self.sampler = SAMPLERS[p["sampler"]]
            self.sigmas = make_sigmas(p.get("schedule", "karras"), int(p["steps"]), float(p["sigma_min"]),
                                      float(p["sigma_max"]), float(p.get("rho", "7")))
        self.max_seed = 2**63 - 1

    def _denoise(self, x, sigma, labels):
        feeds = {"x": x.astype(np.float32), "sigma": sigma.astype(np.float32)}
        if labels is not None:
            feeds["labels"] = labels
        return self.session.run(None, feeds)[0]

    def _generate(self, seeds: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        from onestep.noise import seeded_noise

        z = seeded_noise(seeds.tolist(), self.shape)
        if self.mode == "generator":
            feeds = {"z": z}
            if labels is not None:
                feeds["labels"] = labels
            x = self.session.run(None, feeds)[0]
        else:
            x = self.sampler(self._denoise, z, self.sigmas, labels)
        return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)

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

    def execute(self, requests):
        # Validate each request on its own (a bad one fails alone), then run all good ones as ONE batch.
        parsed, responses = [], [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                parsed.append((i, *self._validate(r)))
            except Exception as e:  # the message goes back to that client only
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        if parsed:
            seeds = np.concatenate([s for _, s, _ in parsed])
            labels = np.concatenate([lab for _, _, lab in parsed]) if self.num_classes else None
            try:
                images = self._generate(seeds, labels)
            except Exception as e:
                for i, _, _ in parsed:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {e}"))
                return responses
            start = 0
            for i, s, _ in parsed:
                out = pb_utils.Tensor("IMAGE", images[start:start + len(s)])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                start += len(s)
        return responses

    def finalize(self):
        self.session = None


if os.environ.get("ONESTEP_TRITON_MODEL_SELFTEST"):  # pragma: no cover - manual debugging aid
    print("onestep triton model importable")

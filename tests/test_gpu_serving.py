"""Where the python-backend models run: the repository's instance kind and onnxruntime providers, the refusals
that keep a GPU configuration from running on the CPU unnoticed, and the I/O-binding path.

Without a GPU: the configs, the refusals (on this CPU-only onnxruntime, for real) and the I/O-binding code on
onnxruntime's CPU provider. The `gpu` tests run the CUDA path itself (in-process and behind Triton) and need
onnxruntime-gpu with an NVIDIA GPU: `pytest -m gpu tests/test_gpu_serving.py`.
"""

import json
import time

import numpy as np
import pytest

from exporters.onnx_export import ExportError
from exporters.triton_repo import DEFAULT_PROVIDERS, build_repository, parse_config
from serving.engine import CUDA, CUDA_OPTIONS, ImageEngine, ProviderError, session_providers
from serving.triton_model import TritonPythonModel, instance_device

CPU = "CPUExecutionProvider"


def _has_cuda() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime-gpu (CUDAExecutionProvider) and an "
                                                        "NVIDIA GPU; this onnxruntime is CPU-only")
SEEDS = list(range(64))
LABELS = [s % 10 for s in SEEDS]


def _model_args(repo, name: str, kind: str, device_id: int = 0) -> dict:
    """The arguments Triton's python backend gives `initialize` for one instance of `name`."""
    from google.protobuf import json_format

    cfg = parse_config(repo / name / "config.pbtxt")
    return {"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
            "model_instance_kind": kind, "model_instance_device_id": str(device_id),
            "model_instance_name": f"{name}_0", "model_repository": str(repo / name), "model_version": "1",
            "model_name": name}


def test_export_kind_gpu_puts_python_models_on_the_cuda_provider(tiny_artifacts, tmp_path):
    from onestep.cli import main
    from tritonclient.grpc import model_config_pb2 as pb

    out = tmp_path / "repo"
    assert main(["export", "triton", "--out", str(out), "--student", str(tiny_artifacts["student_onnx"]),
                 "--teacher", str(tiny_artifacts["teacher_onnx"]), "--teacher-steps", "heun:3", "--name", "g",
                 "--kind", "gpu"]) == 0
    for m in ("g", "g_tensor", "teacher_heun3"):
        cfg = parse_config(out / m / "config.pbtxt")
        assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU], m
        assert cfg.parameters["providers"].string_value == f"{CUDA},{CPU}" == DEFAULT_PROVIDERS["gpu"], m
    assert parse_config(out / "g_onnx" / "config.pbtxt").instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    man = json.loads((out / "repository.json").read_text())
    assert man["batching"]["kind"] == "gpu" and man["batching"]["providers"] == f"{CUDA},{CPU}"
    # the default stays on the CPU, as before
    cpu = parse_config(tiny_artifacts["repo"] / "tiny" / "config.pbtxt")
    assert [g.kind for g in cpu.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert cpu.parameters["providers"].string_value == CPU


@pytest.mark.parametrize("kind,providers,needle", [
    ("cpu", f"{CUDA},{CPU}", "needs a GPU instance"),
    ("gpu", CPU, "would run on the CPU"),
])
def test_export_refuses_providers_that_do_not_fit_the_kind(tiny_artifacts, tmp_path, kind, providers, needle):
    with pytest.raises(ExportError, match=needle):
        build_repository(tmp_path / "r", tiny_artifacts["student_onnx"], "x", kind=kind, onnx_providers=providers)
    assert not (tmp_path / "r" / "x").exists()


def test_instance_device_and_provider_options_follow_triton():
    """The GPU a KIND_GPU instance runs on is the one Triton names; it becomes the CUDA provider's device_id."""
    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "3"}, [CUDA, CPU]) == 3
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, [CPU]) == 0
    with pytest.raises(ProviderError, match="would run on the CPU"):
        instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, [CPU])
    with pytest.raises(ProviderError, match="needs a GPU instance"):
        instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, [CUDA, CPU])
    assert session_providers([CUDA, CPU], 3, available=[CUDA, CPU]) == \
        [(CUDA, {"device_id": "3", **CUDA_OPTIONS}), CPU]
    assert session_providers([CPU], 3, available=[CPU]) == [CPU]
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        session_providers([CUDA, CPU], 0, available=[CPU])


@pytest.mark.skipif(_has_cuda(), reason="checks the CPU-only onnxruntime build; this one has the CUDA provider")
def test_cuda_request_fails_loudly_on_cpu_onnxruntime(tiny_artifacts, tmp_path):
    """A config asking for CUDA never runs on the CPU instead: the engine, and so the Triton model's load, fails."""
    with pytest.raises(ProviderError, match=f"this onnxruntime has no {CUDA}.*onnxruntime-gpu"):
        ImageEngine(tiny_artifacts["student_onnx"], [CUDA, CPU])
    repo = tmp_path / "repo"
    build_repository(repo, tiny_artifacts["student_onnx"], "g", kind="gpu", with_onnx_platform=False)
    for name in ("g", "g_tensor"):
        with pytest.raises(ProviderError, match=f"no {CUDA}"):
            TritonPythonModel().initialize(_model_args(repo, name, "GPU", device_id=0))
    # the same model on a KIND_CPU instance (a hand-edited config) is refused before onnxruntime is asked
    with pytest.raises(ProviderError, match="needs a GPU instance"):
        TritonPythonModel().initialize(_model_args(repo, "g", "CPU"))


def test_cpu_model_initializes_on_the_cpu_without_io_binding(tiny_artifacts):
    model = TritonPythonModel()
    model.initialize(_model_args(tiny_artifacts["repo"], "tiny", "CPU"))
    assert model.engine.device == "cpu" and model.engine.providers == [CPU] and not model.engine.io_binding


def test_io_binding_path_gives_the_same_bytes(tiny_artifacts):
    """The I/O-binding code that CUDA uses, run on onnxruntime's CPU provider: the same images as session.run
    for the student, the teacher's sampler and the raw-tensor path."""
    seeds, labels = SEEDS[:7], LABELS[:7]
    for onnx, kw in ((tiny_artifacts["student_onnx"], {}), (tiny_artifacts["teacher_onnx"], {"steps": 3})):
        plain, bound = ImageEngine(onnx, **kw), ImageEngine(onnx, io_binding=True, **kw)
        assert not plain.io_binding and bound.io_binding
        np.testing.assert_array_equal(bound.generate(seeds, labels), plain.generate(seeds, labels))
    plain, bound = ImageEngine(tiny_artifacts["student_onnx"]), ImageEngine(tiny_artifacts["student_onnx"],
                                                                             io_binding=True)
    z = np.random.default_rng(0).standard_normal((3, *plain.shape)).astype(np.float32)
    out = bound.model_output(z, np.array([1, 2, 3]))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, plain.model_output(z, np.array([1, 2, 3])))


# ---- on a GPU ------------------------------------------------------------------------------------------------

def _report_difference(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return f"max difference {int(d.max())} levels, {int((d > 0).sum())} of {d.size} pixels differ"


@pytest.mark.gpu
@needs_cuda
def test_cuda_engine_runs_on_the_gpu_with_io_binding(tiny_artifacts, record_property):
    eng = ImageEngine(tiny_artifacts["student_onnx"], [CUDA, CPU])
    assert eng.device == "cuda" and eng.device_id == 0 and eng.io_binding and eng.providers[0] == CUDA
    cpu = ImageEngine(tiny_artifacts["student_onnx"])
    from onestep.noise import seeded_noise

    z = seeded_noise(SEEDS, cpu.shape)
    float_diff = float(np.abs(eng.model_output(z, np.array(LABELS)) - cpu.model_output(z, np.array(LABELS))).max())
    gpu_img, cpu_img = eng.generate(SEEDS, LABELS), cpu.generate(SEEDS, LABELS)
    record_property("cuda_vs_cpu_float_max_abs", float_diff)
    record_property("cuda_vs_cpu_bytes", _report_difference(gpu_img, cpu_img))
    print(f"CUDA vs CPU, batch 64: float max |diff| {float_diff:.3g}; bytes: {_report_difference(gpu_img, cpu_img)}")
    assert float_diff < 1e-3  # fp32 without TF32: the graph's own rounding, not a different computation


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_cuda_batch_1_vs_batch_64_bytes(tiny_artifacts, which, record_property):
    """Same seed, same bytes on the GPU, alone or in a batch of 64. On the CPU this holds exactly
    (tests/test_generate.py, tests/test_serving.py); on CUDA it is measured here: a failure reports by how much."""
    onnx, kw = ((tiny_artifacts["student_onnx"], {}) if which == "student"
                else (tiny_artifacts["teacher_onnx"], {"steps": 3}))
    eng = ImageEngine(onnx, [CUDA, CPU], **kw)
    batched = eng.generate(SEEDS, LABELS)
    alone = np.concatenate([eng.generate([s], [lab]) for s, lab in zip(SEEDS, LABELS)])
    same = batched.tobytes() == alone.tobytes()
    record_property(f"cuda_batch_invariance_{which}", "identical" if same else _report_difference(batched, alone))
    if not same:
        from onestep.noise import seeded_noise

        z = seeded_noise(SEEDS, eng.shape)
        f_b = eng.model_output(z, np.array(LABELS))
        f_a = np.concatenate([eng.model_output(z[i:i + 1], np.array(LABELS[i:i + 1])) for i in range(len(SEEDS))])
        pytest.fail(f"{which} on CUDA: batch 64 and batch 1 differ: {_report_difference(batched, alone)}; "
                    f"float output max |diff| {float(np.abs(f_b - f_a).max()):.3g}")


@pytest.mark.gpu
@pytest.mark.triton
@needs_cuda
def test_triton_gpu_instance_serves_the_cuda_images(tiny_artifacts, tmp_path):
    """A `--kind gpu` repository behind the real Triton: the instance loads on GPU 0 with the CUDA provider and
    I/O binding (its own log line says so) and answers with the in-process CUDA engine's bytes."""
    from serving.client import TritonImageClient
    from serving.triton_server import TritonServer

    repo = tmp_path / "repo"
    build_repository(repo, tiny_artifacts["student_onnx"], "g", kind="gpu", with_onnx_platform=False,
                     max_batch=16, response_cache=False)
    expected = ImageEngine(tiny_artifacts["student_onnx"], [CUDA, CPU]).generate([3, 4, 5], [3, 4, 5])
    with TritonServer(repo, models=["g"], ready_timeout=180) as ts:
        c = TritonImageClient(ts.grpc_url, "grpc")
        try:
            got = c.generate("g", [3, 4, 5], [3, 4, 5])
        finally:
            c.close()
        deadline = time.time() + 5
        while "onnxruntime on GPU 0" not in ts.log_path.read_text(errors="replace") and time.time() < deadline:
            time.sleep(0.2)
        log = ts.log_path.read_text(errors="replace")
    assert "onnxruntime on GPU 0" in log and "I/O binding on" in log, log[-3000:]
    np.testing.assert_array_equal(got, expected)

"""`onestep bench --device cuda`: the device's defaults, the refusals, the MFU arithmetic and the GPU report, on
any machine; the `gpu` tests run the benchmark itself on a CUDA device (`pytest -m gpu tests/test_latency_gpu.py`).
Nothing here makes up a GPU figure: without a GPU the benchmark refuses, and the report tests below are fed
hand-made timings whose expected figures are computed by hand."""

import argparse
import json
import shutil

import numpy as np
import pytest

from benchmarks import gpu, latency, stats


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs an NVIDIA GPU and a CUDA build of torch")


def _args(*argv):
    ap = argparse.ArgumentParser()
    latency.add_arguments(ap)
    return ap.parse_args(list(argv))


def test_cpu_defaults_are_unchanged():
    a = latency.resolve_args(_args())
    assert a.device == "cpu" and a.batches == "1,16" and a.providers == "CPUExecutionProvider"
    assert a.backends == "eager,onnxruntime,triton-grpc,triton-http,triton-tensor,api"
    assert a.out == "benchmarks/results/latency_cpu"
    q = latency.resolve_args(_args("--quick", "--out", "x"))
    assert q.batches == "1" and q.teacher_points == "euler:2,heun:3" and q.concurrency == "1,4" and q.out == "x"


def test_cuda_defaults():
    a = latency.resolve_args(_args("--device", "cuda"))
    assert a.batches == "1,8,64,256"
    assert a.backends.split(",") == ["eager", "compile", "compile-cudagraphs", "onnxruntime", "tensorrt", "triton-grpc"]
    assert a.providers == "CUDAExecutionProvider,CPUExecutionProvider"  # what `export triton --kind gpu` serves
    assert a.out == "benchmarks/results/latency_gpu" and a.matmul_n == 8192 and a.trt_precision == "fp16"
    assert latency.resolve_args(_args("--device", "cuda", "--quick")).batches == "1,8"
    kept = latency.resolve_args(_args("--device", "cuda", "--batches", "2,4", "--backends", "eager", "--out", "o"))
    assert (kept.batches, kept.backends, kept.out) == ("2,4", "eager", "o")


@pytest.mark.parametrize("argv,needle", [
    (["--backends", "eager,tensorrt"], "GPU only: add --device cuda"),
    (["--backends", "compile-cudagraphs"], "GPU only"),
    (["--backends", "eager,warp"], "unknown backends"),
    (["--device", "cuda", "--providers", "CPUExecutionProvider"], "no CUDAExecutionProvider"),
])
def test_combinations_that_cannot_mean_what_they_say_are_refused(argv, needle):
    with pytest.raises(ValueError, match=needle):
        latency.resolve_args(_args(*argv))


def test_device_choices_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _args("--device", "rocm")
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(_has_cuda(), reason="checks the refusal where no GPU is usable")
def test_cuda_is_refused_clearly_before_anything_is_loaded(tmp_path, capsys):
    out = tmp_path / "bench"
    with pytest.raises(gpu.DeviceUnavailable, match=r"torch.cuda.is_available\(\) is False"):
        latency.main(["--device", "cuda", "--student", str(tmp_path / "missing.safetensors"), "--out", str(out)])
    assert not list(tmp_path.iterdir())  # nothing written, no model read (the student path does not exist)
    from onestep.cli import main

    assert main(["bench", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs an NVIDIA GPU" in err and "Nothing was measured" in err


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_row_says_not_installed_here():
    assert gpu.tensorrt_problem().startswith("not installed")


def test_mfu_arithmetic():
    m = latency.mfu_figures(1e9, 8, 2e-3, {"bfloat16": 1e13, "float32": 5e12})
    assert m["images_per_s"] == pytest.approx(4000.0)
    assert m["achieved_flops_per_s"] == pytest.approx(4e12)
    assert m["mfu"] == pytest.approx({"bfloat16": 0.4, "float32": 0.8})


def _path(name, ms_per_round, stages=None):
    pr = stats.PathResult(name)
    for ms in ms_per_round:
        pr.calls.append([ms * 1e-3] * 3)
        pr.stages.append([dict(stages(ms)) if stages else {}] * 3)
        pr.extra.append({})
    return pr


def _gpu_res():
    peaks = {dt: {"matmul_n": 8192, "dtype": dt, "flops_per_s": f, "timer": "CUDA events around 10 matmuls"}
             for dt, f in (("bfloat16", 1e13), ("float16", 1e13), ("float32", 2.5e12))}
    return {"peak": peaks["bfloat16"], "peaks": peaks, "rows": [], "ratios": [], "stage_tables": {}, "problems": [],
            "device": "cuda", "machine": {"gpu": "Test GPU", "gpu_driver": "1.2.3", "cuda_torch": "12.8"},
            "torch_threads": 1, "flops_per_image": {"student": 1e8, "teacher_denoiser_call": 1e8},
            "method": {"quick": True}, "method_text": "test", "command": "test", "git_revision": "test",
            "notes": ["a note"], "skipped": {"tensorrt": gpu.tensorrt_problem() or "not installed (test)"}}


def test_rows_mfu_and_gpu_stage_tables_from_given_timings(tmp_path):
    res = _gpu_res()
    split = (lambda ms: {"enqueue (host)": 0.25 * ms * 1e-3, "wait for GPU (synchronize)": 0.75 * ms * 1e-3})
    results = {"eager|student": _path("eager|student", [2.0, 2.0, 2.0], split),
               "eager|teacher_euler2": _path("eager|teacher_euler2", [8.0, 8.0, 8.0], split),
               "onnxruntime|student": _path("onnxruntime|student", [4.0] * 3,
                                            lambda ms: {"noise": 1e-3, "model": 2e-3, "encode (uint8)": 1e-3})}
    latency._collect(res, results, 8, {"student": 1, "teacher_euler2": 2}, 10**8, 10**8)
    rows = {(r["backend"], r["model"]): r for r in res["rows"]}
    s = rows[("eager", "student")]
    # 1e8 FLOP/image x 8 images / 2 ms = 4e11 FLOP/s: 4% of the bf16 peak, 16% of the fp32 peak
    assert s["images_per_s"] == pytest.approx(4000.0) and s["achieved_gflops"] == pytest.approx(400.0)
    assert s["mfu"] == pytest.approx(0.04) and s["mfu_by_peak"]["float32"] == pytest.approx(0.16)
    t = rows[("eager", "teacher_euler2")]  # 2 NFE x 1e8 x 8 / 8 ms = 2e11
    assert t["mfu"] == pytest.approx(0.02)
    table = res["stage_tables"]["eager/student/batch8"]
    assert table["order"] == ["enqueue (host)", "wait for GPU (synchronize)"] and table["adds_up"]
    assert res["stage_tables"]["onnxruntime/student/batch8"]["adds_up"]
    (sp,) = [r for r in res["ratios"] if r["kind"] == "speedup"]
    assert sp["median"] == pytest.approx(4.0) and sp["backend"] == "eager"
    res["summary"] = latency.summarise(res)
    md = latency.to_markdown(res)
    assert "Device: Test GPU (driver 1.2.3, CUDA 12.8" in md and "10.0 TFLOP/s" in md and "float32 2.5" in md
    assert "| MFU (bfloat16 peak) | MFU (fp32 peak) |" in md and "| 4.000% | 16.000% |" in md
    assert "## Not measured" in md and "| tensorrt | not installed" in md and "- a note" in md
    latency.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cpu_report_keeps_its_form():
    res = {**_gpu_res(), "device": "cpu", "machine": {"cpu_model": "Test CPU", "cpu_count": 2}, "notes": [],
           "skipped": {}}
    res.pop("peaks")
    res["peak"] = {"matmul_n": 1024, "dtype": "float32", "flops_per_s": 1e11}
    latency._collect(res, {"eager|student": _path("eager|student", [2.0] * 3)}, 1, {"student": 1}, 10**8, 10**8)
    assert "mfu_by_peak" not in res["rows"][0] and not res["stage_tables"]  # no stages from CPU eager calls
    res["summary"] = latency.summarise(res)
    md = latency.to_markdown(res)
    assert "peak (fp32 matmul 1024^3, same run): 100.0 GFLOP/s" in md and "| images/s | MFU |" in md
    assert "Not measured" not in md and "Device:" not in md


# --- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_bench_quick_on_cuda(tiny_artifacts, tmp_path):
    """A --quick cuda run on the tiny models: GPU name and driver recorded, the matmul peaks measured, every
    requested backend measured at batches 1 and 8 or named with the reason it was not."""
    import torch

    work = tmp_path / "work"
    work.mkdir()
    for kind in ("student", "teacher"):
        for suffix in (".onnx", ".onnx.json"):
            shutil.copy(tiny_artifacts[f"{kind}_onnx"].with_name(f"{kind}{suffix}"), work / f"{kind}{suffix}")
    out = tmp_path / "bench_gpu"
    backends = ["eager", "compile", "compile-cudagraphs", "onnxruntime", "tensorrt", "triton-grpc"]
    args = _args("--device", "cuda", "--student", str(tiny_artifacts["student_ckpt"]), "--teacher",
                 str(tiny_artifacts["teacher_ckpt"]), "--quick", "--backends", ",".join(backends), "--concurrency", "",
                 "--window-s", "0", "--min-calls", "6", "--rounds", "3", "--matmul-n", "4096", "--workdir", str(work),
                 "--out", str(out))
    assert latency.main_args(args) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["device"] == "cuda" and res["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert res["machine"]["cuda_torch"] == torch.version.cuda and "gpu_driver" in res["machine"]
    assert res["peak"]["dtype"] == "bfloat16" and set(res["peaks"]) == {"bfloat16", "float16", "float32"}
    assert res["peaks"]["bfloat16"]["flops_per_s"] > res["peaks"]["float32"]["flops_per_s"] > 0
    measured = {r["backend"] for r in res["rows"]}
    for b in backends:
        assert b in measured or any(k.split("|")[0] == b or k == b for k in res["skipped"]), b
    assert {r["batch"] for r in res["rows"] if r["backend"] == "eager"} == {1, 8}
    for r in res["rows"]:
        assert 0 < r["mfu"] < 1 and r["p50_ci_ms"][0] <= r["p50_ms"] <= r["p50_ci_ms"][1]
    assert res["stage_tables"]["eager/student/batch8"]["order"] == ["enqueue (host)", "wait for GPU (synchronize)"]
    if __import__("importlib").util.find_spec("tensorrt") is None:
        assert res["skipped"]["tensorrt"].startswith("not installed")
    md = out.with_suffix(".md").read_text()
    assert torch.cuda.get_device_name(0) in md and "MFU (bfloat16 peak)" in md
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.gpu
@needs_cuda
def test_matmul_peak_on_cuda():
    p = gpu.measure_matmul_peak("bfloat16", n=2048, seconds=0.2)
    assert p["dtype"] == "bfloat16" and p["flops_per_s"] == pytest.approx(2 * 2048**3 / p["best_s"])
    assert p["best_s"] <= p["median_s"] and p["timings"] >= 5


def test_tensorrt_adapter_feeds_the_engine_as_the_served_engine_feeds_onnxruntime(tiny_artifacts, monkeypatch):
    """TensorRTImage's sampling around an engine, with onnxruntime (CPU) standing in for the engine: the same
    images as serving.engine.ImageEngine, student and teacher. The TensorRT engine itself runs in the gpu tests."""
    import onnxruntime as ort

    import serving.trt_runner
    from exporters.onnx_export import read_sidecar
    from onestep.noise import seeded_noise
    from serving.engine import ImageEngine

    class OnnxAsEngine:
        def __init__(self, path, check=True):
            self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.sess.get_inputs()] + [o.name for o in self.sess.get_outputs()]

        def run(self, feeds):
            return self.sess.run(None, feeds)[0]

    monkeypatch.setattr(serving.trt_runner, "TensorRTRunner", OnnxAsEngine)
    z = seeded_noise([3, 4, 5], (1, 32, 32))
    labels = np.array([1, 2, 3], np.int64)
    s_onnx, t_onnx = tiny_artifacts["student_onnx"], tiny_artifacts["teacher_onnx"]
    got = gpu.TensorRTImage(s_onnx, read_sidecar(s_onnx)).model_output(z, labels)
    np.testing.assert_array_equal(got, ImageEngine(s_onnx).model_output(z, labels))
    got = gpu.TensorRTImage(t_onnx, read_sidecar(t_onnx), "heun", 3).model_output(z, labels)
    np.testing.assert_array_equal(got, ImageEngine(t_onnx, sampler="heun", steps=3).model_output(z, labels))

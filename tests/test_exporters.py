import json

import numpy as np
import pytest
import torch

from exporters.onnx_export import ExportError, artifact_sidecar, export_onnx, read_sidecar
from exporters.triton_repo import (DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_MAX_QUEUE_SIZE, DEFAULT_PREFERRED_BATCH_SIZES,
                                   DEFAULT_QUEUE_TIMEOUT_US, build_repository, check_name, parse_config)
from onestep.checkpoint import load_model
from onestep.noise import seeded_noise

SIDECAR_KEYS = {"sha256", "source_sha256", "method", "opset", "precision", "inputs", "outputs", "parity",
                "export_seconds", "versions", "graph", "image_shape", "num_classes", "git_revision", "machine"}


def test_student_onnx_parity_and_sidecar(tiny_artifacts):
    side = tiny_artifacts["student_sidecar"]
    assert SIDECAR_KEYS <= set(side)
    assert side["opset"] >= 17 and side["precision"] == "fp32" and side["graph"] == "generator"
    assert set(side["parity"]["per_batch"]) == {"1", "3", "8"}
    assert side["parity"]["max_abs_err"] <= 1e-4
    assert side["inputs"][0] == {"name": "z", "dtype": "float32", "shape": ["batch", 1, 32, 32]}
    assert side["versions"]["onnxruntime"] and side["versions"]["torch"]
    assert read_sidecar(tiny_artifacts["student_onnx"])["sha256"] == side["sha256"]


def test_onnx_matches_pytorch_and_is_batch_invariant(tiny_artifacts):
    import onnxruntime as ort

    g, _ = load_model(tiny_artifacts["student_ckpt"])
    sess = ort.InferenceSession(str(tiny_artifacts["student_onnx"]), providers=["CPUExecutionProvider"])
    z = seeded_noise([1, 7, 9], (1, 32, 32))
    labels = np.array([0, 3, 5])
    batched = sess.run(None, {"z": z, "labels": labels})[0]
    alone = sess.run(None, {"z": z[1:2], "labels": labels[1:2]})[0]
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)
    with torch.no_grad():
        ref = g(torch.from_numpy(z), torch.from_numpy(labels)).clamp(-1, 1).numpy()
    np.testing.assert_allclose(batched, ref, atol=1e-4)


def test_teacher_denoiser_export(tiny_artifacts):
    side = tiny_artifacts["teacher_sidecar"]
    assert side["graph"] == "denoiser" and [i["name"] for i in side["inputs"]] == ["x", "sigma", "labels"]
    assert side["sigma_min"] == 0.002 and side["sigma_max"] == 80.0


def test_fp16_variant_within_its_tolerance(tiny_artifacts, tmp_path):
    side = export_onnx(tiny_artifacts["student_ckpt"], tmp_path / "s16.onnx", precision="fp16")
    assert side["precision"] == "fp16" and side["parity"]["max_abs_err"] <= 2e-2


def test_export_fails_above_tolerance(tiny_artifacts, tmp_path):
    with pytest.raises(ExportError, match="exceeds tolerance"):
        export_onnx(tiny_artifacts["student_ckpt"], tmp_path / "x.onnx", precision="fp16", tolerance=1e-9)
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(tiny_artifacts["student_ckpt"], tmp_path / "y.onnx", opset=13)


def test_corrupt_onnx_rejected(tiny_artifacts, tmp_path):
    import shutil

    bad = tmp_path / "bad.onnx"
    shutil.copy(tiny_artifacts["student_onnx"], bad)
    shutil.copy(artifact_sidecar(tiny_artifacts["student_onnx"]), artifact_sidecar(bad))
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(ExportError, match="corrupt"):
        read_sidecar(bad)
    with pytest.raises(ExportError, match="no sidecar"):
        read_sidecar(tiny_artifacts["root"] / "student.safetensors")


def test_triton_configs_parse_with_schema(tiny_artifacts):
    repo = tiny_artifacts["repo"]
    manifest = json.loads((repo / "repository.json").read_text())
    assert set(manifest["models"]) == {"tiny", "tiny_tensor", "tiny_onnx", "teacher_heun3"}
    for name in manifest["models"]:
        cfg = parse_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.max_batch_size == 16
        db = cfg.dynamic_batching
        assert db.max_queue_delay_microseconds == 20000
        assert list(db.preferred_batch_size) == [16]  # no preferred sizes by default: only the maximum batch
        # no queue policy unless asked for: on the bundled Triton any policy makes the batcher hold some requests
        # ~500 ms (benchmarks/results/queue_policy.md)
        assert DEFAULT_MAX_QUEUE_SIZE == DEFAULT_QUEUE_TIMEOUT_US == 0 and not db.HasField("default_queue_policy")
        assert sorted(w.batch_size for w in cfg.model_warmup) == [1, 16]  # batch 1 and the maximum batch
        for w in cfg.model_warmup:
            assert set(w.inputs) == {i.name for i in cfg.input} and all(v.zero_data for v in w.inputs.values())
        assert (repo / name / "1").is_dir()
    py = parse_config(repo / "tiny" / "config.pbtxt")
    assert py.backend == "python" and [i.name for i in py.input] == ["SEED", "LABEL"]
    assert list(py.output[0].dims) == [1, 32, 32]
    ort_cfg = parse_config(repo / "tiny_onnx" / "config.pbtxt")
    assert ort_cfg.platform == "onnxruntime_onnx" and ort_cfg.input[1].HasField("reshape")
    raw = parse_config(repo / "tiny_tensor" / "config.pbtxt")  # the raw-tensor contract on the python backend
    assert raw.backend == "python" and not raw.platform and raw.parameters["mode"].string_value == "tensor"
    assert [(i.name, list(i.dims)) for i in raw.input] == [(i.name, list(i.dims)) for i in ort_cfg.input]
    from tritonclient.grpc import model_config_pb2 as pb

    assert [(o.name, o.data_type, list(o.dims)) for o in raw.output] == \
        [(o.name, o.data_type, list(o.dims)) for o in ort_cfg.output] == [("image", pb.TYPE_FP32, [1, 32, 32])]
    assert (repo / "tiny_tensor" / "1" / "model.py").exists() and (repo / "tiny_tensor" / "1" / "model.onnx").exists()
    assert manifest["models"]["tiny_tensor"]["local"] and not manifest["models"]["tiny_onnx"]["local"]
    assert manifest["models"]["tiny_tensor"]["backend"] != "python"  # not a SEED -> IMAGE model for the API
    assert manifest["models"]["teacher_heun3"]["nfe"] == 5
    assert manifest["batching"]["max_queue_delay_us"] == 20000


def test_export_triton_cli_batching_options(tiny_artifacts, tmp_path):
    from onestep.cli import main

    out = tmp_path / "repo"
    assert main(["export", "triton", "--out", str(out), "--student", str(tiny_artifacts["student_onnx"]),
                 "--name", "s", "--max-batch", "32"]) == 0
    cfg = parse_config(out / "s" / "config.pbtxt")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == DEFAULT_MAX_QUEUE_DELAY_US
    assert DEFAULT_PREFERRED_BATCH_SIZES == () and DEFAULT_MAX_QUEUE_DELAY_US == 0  # queue_delay.md's choice
    assert list(cfg.dynamic_batching.preferred_batch_size) == [32]  # the maximum batch is always preferred
    assert sorted(w.batch_size for w in cfg.model_warmup) == [1, 32]
    out2 = tmp_path / "repo2"
    assert main(["export", "triton", "--out", str(out2), "--student", str(tiny_artifacts["student_onnx"]),
                 "--name", "s", "--max-batch", "32", "--max-queue-delay-us", "500", "--preferred-batch-sizes",
                 "4,16", "--max-queue-size", "10", "--queue-timeout-us", "0"]) == 0
    for m in ("s", "s_tensor", "s_onnx"):
        db = parse_config(out2 / m / "config.pbtxt").dynamic_batching
        assert db.max_queue_delay_microseconds == 500 and list(db.preferred_batch_size) == [4, 16, 32]
        q = db.default_queue_policy
        assert q.max_queue_size == 10 and q.default_timeout_microseconds == 0
        assert q.timeout_action == q.REJECT and q.allow_timeout_override
    out3 = tmp_path / "repo3"
    assert main(["export", "triton", "--out", str(out3), "--student", str(tiny_artifacts["student_onnx"]),
                 "--name", "s", "--queue-timeout-us", "5000"]) == 0
    q = parse_config(out3 / "s" / "config.pbtxt").dynamic_batching.default_queue_policy
    assert q.default_timeout_microseconds == 5000 and q.max_queue_size == 0 and q.allow_timeout_override


def test_repository_rejects_bad_names_and_graphs(tiny_artifacts, tmp_path):
    with pytest.raises(ExportError, match="invalid model name"):
        check_name("../etc")
    with pytest.raises(ExportError, match="must be a generator"):
        build_repository(tmp_path / "r", tiny_artifacts["teacher_onnx"], "x")


def test_tensorrt_clear_error_without_tensorrt(tiny_artifacts, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; the gated test below covers it")
    except ImportError:
        pass
    from exporters.tensorrt_export import build_engine

    with pytest.raises(ExportError, match="NVIDIA's containers"):
        build_engine(tiny_artifacts["student_onnx"], tmp_path)


def test_engine_key_changes_with_every_component():
    from exporters.tensorrt_export import engine_key

    base = engine_key("abc", "10.8", "9.0", "fp16", (1, 16, 64))
    assert len({base, engine_key("abd", "10.8", "9.0", "fp16", (1, 16, 64)),
                engine_key("abc", "10.9", "9.0", "fp16", (1, 16, 64)),
                engine_key("abc", "10.8", "8.9", "fp16", (1, 16, 64)),
                engine_key("abc", "10.8", "9.0", "bf16", (1, 16, 64)),
                engine_key("abc", "10.8", "9.0", "fp16", (1, 32, 64))}) == 6


@pytest.mark.tensorrt
def test_tensorrt_engine_build_cache_and_parity(tiny_artifacts, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT runs only in NVIDIA's containers")
    from exporters.tensorrt_export import build_engine, load_engine

    side = build_engine(tiny_artifacts["student_onnx"], tmp_path, "fp16", (1, 4, 16))
    assert not side["cache_hit"] and side["parity"]["max_abs_err_vs_onnxruntime"] < 2e-2
    again = build_engine(tiny_artifacts["student_onnx"], tmp_path, "fp16", (1, 4, 16))
    assert again["cache_hit"] and again["path"] == side["path"]
    load_engine(side["path"])


def test_truncated_engine_rejected_before_tensorrt_is_touched(tmp_path):
    from exporters.tensorrt_export import load_engine
    from onestep.provenance import sha256_file

    eng = tmp_path / "m.plan"
    eng.write_bytes(b"\x00" * 4096)
    artifact_sidecar(eng).write_text(json.dumps({"sha256": sha256_file(eng)}))
    eng.write_bytes(b"\x00" * 100)  # truncated after the sidecar was written
    with pytest.raises(ExportError, match="corrupt"):
        load_engine(eng)
    artifact_sidecar(eng).write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_engine(eng)

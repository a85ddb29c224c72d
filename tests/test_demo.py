import json

import pytest


@pytest.mark.triton
def test_demo_end_to_end_on_tiny_models(tiny_artifacts, tmp_path):
    from onestep.demo import run_demo

    summary = run_demo(tmp_path / "demo", teacher_steps=2, teacher_path=tiny_artifacts["teacher_ckpt"],
                       student_path=tiny_artifacts["student_ckpt"])
    assert summary["paths_identical"] is True
    assert summary["onnx_parity_max_abs_err"]["student"] <= 1e-4
    assert set(summary["served_p50_ms_batch1"]) == {"fmnist_student", "teacher_heun2"}
    assert (tmp_path / "demo" / "api-seed7-label7.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["api_png_bytes"] > 0

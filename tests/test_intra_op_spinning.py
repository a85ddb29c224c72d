"""onnxruntime's intra-op spinning as a served-model setting: written into the Triton configs, read by the
python-backend model, set on the session, and without effect on the images."""

import json

import numpy as np
import pytest

from exporters.triton_repo import parse_config
from serving.engine import ImageEngine

SPIN_KEY = "session.intra_op.allow_spinning"


def test_engine_sets_the_session_option_and_gives_the_same_images(tiny_artifacts):
    spin = ImageEngine(tiny_artifacts["student_onnx"])
    calm = ImageEngine(tiny_artifacts["student_onnx"], intra_op_spinning=False)
    assert calm.session.get_session_options().get_session_config_entry(SPIN_KEY) == "0"
    assert spin.intra_op_spinning and not calm.intra_op_spinning
    with pytest.raises(Exception):  # onnxruntime's default is left alone: the entry is not set at all
        spin.session.get_session_options().get_session_config_entry(SPIN_KEY)
    seeds, labels = [3, 11, 12], [1, 4, 9]
    np.testing.assert_array_equal(spin.generate(seeds, labels), calm.generate(seeds, labels))


def test_export_writes_the_setting_and_the_backend_model_reads_it(tiny_artifacts, tmp_path):
    from onestep.cli import main
    from serving import triton_model

    for flag, want in ((None, "1"), ("--no-intra-op-spinning", "0")):
        out = tmp_path / f"repo{want}"
        argv = ["export", "triton", "--out", str(out), "--student", str(tiny_artifacts["student_onnx"]), "--name", "s",
                "--teacher", str(tiny_artifacts["teacher_onnx"]), "--teacher-steps", "euler:2", "--max-batch", "4"]
        assert main(argv + ([flag] if flag else [])) == 0
        for model in ("s", "s_tensor", "teacher_euler2"):
            cfg = parse_config(out / model / "config.pbtxt")
            assert cfg.parameters["intra_op_spinning"].string_value == want, model
        assert json.loads((out / "repository.json").read_text())["batching"]["intra_op_spinning"] is (want == "1")
        # the python-backend model builds its engine from exactly these parameters
        cfg = parse_config(out / "s" / "config.pbtxt")
        from google.protobuf import json_format

        m = triton_model.TritonPythonModel()
        m.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                      "model_repository": str(out / "s"), "model_version": "1", "model_instance_kind": "CPU"})
        assert m.engine.intra_op_spinning is (want == "1")

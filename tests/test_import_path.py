"""benchmarks.import_path with a tiny budget: a diffusers DDPM trained with diffusers' classes, imported,
distilled with SiD, evaluated (classifier space only) and reported; a rerun skips every finished stage, and a
DDPM run resumed from its checkpoint continues exactly where it stopped."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tests.conftest import needs_fmnist

pytestmark = needs_fmnist

TINY = ["--teacher-steps", "4", "--teacher-batch", "8", "--channels", "8,16", "--ckpt-every", "2",
        "--log-every", "2", "--parity-steps", "3", "--sid-steps", "3", "--sid-batch", "4", "--sid-fake-warmup", "1",
        "--teacher-points", "2", "--n", "32", "--n-inception", "0", "--no-progress"]


def _run(argv) -> dict:
    from benchmarks.import_path import build_parser, run_pipeline

    a = build_parser().parse_args([str(x) for x in argv])
    return run_pipeline(a, "python -m benchmarks.import_path " + " ".join(map(str, argv)))


def test_pipeline_end_to_end_and_rerun_skips(tmp_path, capsys):
    out, work = tmp_path / "res" / "import_path", tmp_path / "work"
    argv = ["--out", out, "--work", work, *TINY]
    assert _run(argv) == {s: "ran" for s in ("train_ddpm", "import", "distill", "evaluate", "report")}

    # the DDPM is a real diffusers pipeline folder, and the teacher came through the import
    assert json.loads((work / "ddpm" / "model_index.json").read_text())["unet"][-1] == "UNet2DModel"
    assert (work / "ddpm" / "scheduler" / "scheduler_config.json").is_file()
    assert (work / "ddpm-train" / "state.pt").is_file()
    assert (work / "sid" / "model.safetensors").is_file()
    side = json.loads((work / "teacher.json").read_text())
    assert side["model"]["kind"] == "diffusers-denoiser" and side["model"]["num_classes"] == 0
    assert side["parity"]["rel_err"] <= side["parity"]["tolerance"]

    res = json.loads(out.with_suffix(".json").read_text())
    assert res["ddpm"]["iterations"] == 4 and res["ddpm"]["batch"] == 8 and res["ddpm"]["threads"] == 1
    assert res["sid"]["iterations"] == 3 and res["sid"]["batch"] == 4
    assert res["import"]["parity"] == side["parity"]
    rows = {r["label"]: r for r in res["evaluation"]["rows"]}
    assert set(rows) == {"teacher-ddim2", "student-sid"}
    assert rows["teacher-ddim2"]["nfe"] == 2 and rows["student-sid"]["nfe"] == 1
    for r in rows.values():
        assert math.isfinite(r["classifier_kid"]) and math.isfinite(r["classifier_fd"])
        assert "inception_kid" not in r  # --n-inception 0
        assert (tmp_path / "res" / "import_path-grids" / r["grid"]).stat().st_size > 0
    assert math.isfinite(res["evaluation"]["baselines"]["classifier"]["kid"])
    md = out.with_suffix(".md").read_text()
    assert "student-sid" in md and "teacher-ddim2" in md and "--teacher-steps 4" in md

    # a rerun finds every output and runs nothing
    capsys.readouterr()
    assert _run(argv) == {s: "skipped" for s in ("train_ddpm", "import", "distill", "evaluate", "report")}

    # a new evaluation setting re-runs only evaluation and report
    assert _run([*argv, "--n", "24"]) == {"train_ddpm": "skipped", "import": "skipped", "distill": "skipped",
                                          "evaluate": "ran", "report": "ran"}
    assert json.loads(out.with_suffix(".json").read_text())["evaluation"]["n"] == 24

    # a different training budget in the same work folder is refused
    with pytest.raises(SystemExit, match="other budget options"):
        _run([*argv, "--teacher-steps", "5"])


def test_ddpm_resume_continues_exactly(tmp_path):
    """4 iterations straight == 2 iterations, then a resumed run from the step-2 checkpoint to 4."""
    import torch
    from safetensors.torch import load_file

    from benchmarks.import_path import build_parser, train_ddpm

    base = ["--out", tmp_path / "o", "--teacher-batch", "4", "--channels", "8,16", "--ckpt-every", "2",
            "--log-every", "1", "--teacher-warmup", "1"]

    def args(work, steps):
        return build_parser().parse_args([str(x) for x in [*base, "--work", work, "--teacher-steps", steps]])

    torch.set_num_threads(1)
    straight = train_ddpm(tmp_path / "a", args(tmp_path / "a", 4))
    train_ddpm(tmp_path / "b", args(tmp_path / "b", 2))  # stops at 2 with state.pt at iteration 2
    shutil.rmtree(tmp_path / "b" / "ddpm")
    resumed = train_ddpm(tmp_path / "b", args(tmp_path / "b", 4))
    assert resumed["iterations"] == straight["iterations"] == 4
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]])
    wa = load_file(tmp_path / "a" / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

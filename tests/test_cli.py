import subprocess
import sys

import pytest

from onestep.cli import main

VERBS = ["train", "distill", "import", "presets", "sample", "train-classifier", "evaluate", "export", "serve", "generate",
         "bench", "demo"]


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for v in VERBS:
        assert v in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb):
    out = subprocess.run([sys.executable, "-m", "onestep.cli", verb, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_bad_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--preset", "nope", "--run-dir", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_bad_override(tmp_path, capsys):
    assert main(["train", "--preset", "tiny-teacher", "--run-dir", str(tmp_path), "--set", "train.stepz=3"]) == 2
    assert "no field 'stepz'" in capsys.readouterr().err

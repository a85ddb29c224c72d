import subprocess
import sys


def test_serving_never_imports_torch():
    code = ("import sys, serving.api, serving.engine, serving.generate, serving.client, serving.triton_server, "
            "serving.cli, serving.triton_model, onestep.cli, onestep.noise, onestep.samplers\n"
            "from onestep.cli import build_parser; build_parser()\n"
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

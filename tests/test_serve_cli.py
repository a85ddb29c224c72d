"""`onestep serve` as a user runs it: a subprocess that starts Triton + the API, answers, and on SIGTERM
drains (readiness 503, requests still served), then stops Triton too (Triton runs in its own session and
must not outlive the command); if Triton dies, the command exits non-zero."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from serving.triton_server import free_port

pytestmark = pytest.mark.triton


def _serve(tiny_artifacts, port, tmp_path, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "onestep.cli", "serve", "--repo", str(tiny_artifacts["repo"]),
                             "--port", str(port), "--triton-log", str(tmp_path / "triton.log"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _status(url, key=None, body=None, timeout=30):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_ready(p, port, key=None):
    deadline = time.time() + 120
    last_error = None
    while True:
        try:
            if _status(f"http://127.0.0.1:{port}/readyz", key, timeout=2)[0] == 200:
                return
        except OSError as e:  # not listening yet: poll again until the deadline
            last_error = e
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, f"serve never became ready ({last_error})"
        time.sleep(0.5)


def _children(pid):
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()


def test_serve_answers_drains_and_stops_triton_on_sigterm(tiny_artifacts, tmp_path):
    port = free_port()
    keyfile = tmp_path / "key"
    keyfile.write_text("file-secret\n")
    p = _serve(tiny_artifacts, port, tmp_path, "--drain", "3", env={"ONESTEP_API_KEY_FILE": str(keyfile)})
    try:
        _wait_ready(p, port, "file-secret")
        assert _status(f"http://127.0.0.1:{port}/readyz")[0] == 401  # the key from the file is required
        status, body = _status(f"http://127.0.0.1:{port}/v1/generate", "file-secret", {"model": "tiny", "seed": 3,
                                                                                        "n": 2})
        assert status == 200 and len(json.loads(body)["images"]) == 2
        triton_pids = _children(p.pid)
        assert triton_pids
        for pid in triton_pids:
            assert b"file-secret" not in open(f"/proc/{pid}/environ", "rb").read()
            assert b"file-secret" not in open(f"/proc/{pid}/cmdline", "rb").read()
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert _status(f"http://127.0.0.1:{port}/readyz", "file-secret")[0] == 503  # draining
        status, _ = _status(f"http://127.0.0.1:{port}/v1/generate", "file-secret", {"model": "tiny", "seed": 5})
        assert status == 200  # still served while draining
        p.wait(60)
        time.sleep(1)
        for pid in triton_pids:
            assert not os.path.exists(f"/proc/{pid}") or \
                open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"tritonserver {pid} outlived serve"
    finally:
        if p.poll() is None:
            p.kill()


def test_serve_exits_nonzero_when_triton_dies(tiny_artifacts, tmp_path):
    port = free_port()
    p = _serve(tiny_artifacts, port, tmp_path)
    try:
        _wait_ready(p, port)
        for pid in _children(p.pid):
            os.killpg(int(pid), signal.SIGKILL)
        assert p.wait(60) == 3
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("extra,needle", [
    (("--host", "0.0.0.0"), "refusing to bind 0.0.0.0 without an API key"),
    (("--max-images", "17"), "exceeds the models' max_batch_size 16"),
])
def test_serve_refuses_unsafe_settings_before_starting(tiny_artifacts, tmp_path, extra, needle):
    p = _serve(tiny_artifacts, free_port(), tmp_path, *extra, env={"ONESTEP_API_KEY": ""})
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and needle in out, out


def test_api_key_is_not_a_command_line_flag(tiny_artifacts, tmp_path):
    p = _serve(tiny_artifacts, free_port(), tmp_path, "--api-key", "visible-in-ps")
    p.communicate(timeout=60)
    assert p.returncode == 2


def test_uvicorn_runs_the_c_parser_and_loop():
    """The serve extra installs httptools and uvloop, which uvicorn's "auto" settings (used by `onestep serve` and
    the API process) pick over h11 and asyncio's loop."""
    import uvicorn

    async def app(scope, receive, send):  # pragma: no cover - only the protocol classes are resolved
        raise AssertionError("never served")

    cfg = uvicorn.Config(app)
    cfg.load()
    assert cfg.http_protocol_class.__name__ == "HttpToolsProtocol"
    assert cfg.loop == "auto"
    import importlib.util

    assert importlib.util.find_spec("uvloop") is not None

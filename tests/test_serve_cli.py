"""`onestep serve` as a user runs it: a subprocess that starts Triton + the API, answers, and on SIGTERM
stops Triton too (Triton runs in its own session and must not outlive the command)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from serving.triton_server import free_port

pytestmark = pytest.mark.triton


def test_serve_answers_and_stops_triton_on_sigterm(tiny_artifacts, tmp_path):
    port = free_port()
    log = tmp_path / "triton.log"
    p = subprocess.Popen([sys.executable, "-m", "onestep.cli", "serve", "--repo", str(tiny_artifacts["repo"]),
                          "--port", str(port), "--triton-log", str(log)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        last_error = None
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError as e:  # not listening yet: poll again until the deadline
                last_error = e
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline, f"serve never became ready ({last_error})"
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", method="POST",
                                     data=json.dumps({"model": "tiny", "seed": 3, "n": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.loads(r.read())["images"]) == 2
        triton_pids = subprocess.run(["pgrep", "-f", f"model-repository={tiny_artifacts['repo'].resolve()}"],
                                     capture_output=True, text=True).stdout.split()
        assert triton_pids
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        time.sleep(1)
        for pid in triton_pids:
            assert not os.path.exists(f"/proc/{pid}") or \
                open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"tritonserver {pid} outlived serve"
    finally:
        if p.poll() is None:
            p.kill()

"""The API in a process of its own (how the latency benchmark runs it, as `onestep serve` does) and the
benchmark's kept-alive client connection. No Triton needed: the API answers these requests alone."""

import json
import os
import urllib.request

import pytest

from benchmarks.latency import APIConnection
from serving.api import APISettings
from serving.background import APIProcess
from serving.triton_server import free_port

MODELS = {"tiny_student": {"role": "student", "backend": "python", "num_classes": 10, "image_shape": [1, 32, 32],
                           "nfe": 1}}


def test_api_process_serves_keeps_the_connection_and_stops(tmp_path):
    key = "k-" + "x" * 30
    log = tmp_path / "api.log"
    settings = APISettings(triton_url=f"127.0.0.1:{free_port()}", models=MODELS, api_key=key, watch_interval_s=30)
    with APIProcess(settings, log_path=str(log)) as api:
        pid = api.proc.pid
        assert pid != os.getpid()
        # the key travels on stdin, never on the command line
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode()
        assert key not in cmdline and "serving.background" in cmdline
        req = urllib.request.Request(api.url + "/v1/models", headers={"X-API-Key": key})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert [m["name"] for m in json.loads(r.read())["models"]] == ["tiny_student"]
        conn = APIConnection(api.url)
        with pytest.raises(RuntimeError, match="HTTP 401"):  # no key: refused, and the connection stays open
            conn.post("/v1/generate", b'{"model": "tiny_student"}')
        sock = conn.conn.sock
        with pytest.raises(RuntimeError, match="HTTP 401"):
            conn.post("/v1/generate", b'{"model": "tiny_student"}')
        assert conn.conn.sock is sock  # the same TCP connection: kept alive
        conn.close()
    assert api.proc.poll() is not None  # stopped
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert [x["status"] for x in lines if x.get("path") == "/v1/generate"] == [401, 401]  # access log, as serve


def test_api_process_that_cannot_start_says_so(tmp_path):
    busy = free_port()
    import socket

    with socket.socket() as s:  # the port is taken: uvicorn exits, and start() reports it instead of hanging
        s.bind(("127.0.0.1", busy))
        s.listen()
        settings = APISettings(triton_url=f"127.0.0.1:{free_port()}", models=MODELS)
        with pytest.raises(RuntimeError, match="API process"):
            APIProcess(settings, port=busy, start_timeout=30).start()


def test_connection_closed_by_the_server_while_idle_is_reopened_once():
    import socket
    import threading

    # a tiny HTTP/1.1 server that answers one request per connection and then closes it (as uvicorn closes an idle
    # kept-alive connection): the second post finds the old connection dead and must reconnect
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    accepted = []

    def serve():
        for _ in range(2):
            c, _ = srv.accept()
            accepted.append(c)
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer-Timing: total;dur=1.000\r\n\r\nok")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    conn = APIConnection(f"http://127.0.0.1:{port}", timeout=5)
    assert conn.post("/v1/generate", b"{}") == (b"ok", "total;dur=1.000")
    assert conn.post("/v1/generate", b"{}") == (b"ok", "total;dur=1.000")
    t.join(5)
    assert len(accepted) == 2  # one reconnect, no more
    conn.close()
    srv.close()

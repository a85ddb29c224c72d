"""The HTTP API under uvicorn in the background: in a thread of this process (demo, tests) or in a process of its
own (benchmarks: the API then shares no interpreter lock with the client that measures it, as under
`onestep serve`).

    python -m serving.background --port 8000 < settings.json   # what APIProcess runs: settings JSON on stdin
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


class APIThread:
    """`with APIThread(settings) as api: api.url` runs the real app on a free loopback port."""

    def __init__(self, settings, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 30.0):
        import uvicorn

        from serving.api import create_app
        from serving.triton_server import free_port

        self.host, self.port = host, port or free_port()
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "APIThread":
        self.thread.start()
        deadline = time.time() + self.start_timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> "APIThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class APIProcess:
    """`with APIProcess(settings) as api: api.url` runs the real app in a child Python process on a free loopback
    port. The settings travel on the child's stdin (an API key never shows in `ps`); the child is ready when
    /healthz answers; stop() sends SIGTERM, then SIGKILL after `stop_timeout`. Like `onestep serve`, the child
    writes its JSON access and event lines to stderr: to `log_path` (default: discarded)."""

    def __init__(self, settings, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 60.0,
                 stop_timeout: float = 10.0, log_path: str | None = None):
        from serving.triton_server import free_port

        self.settings = dataclasses.asdict(settings)
        self.host, self.port = host, port or free_port()
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "APIProcess":
        err = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "serving.background", "--host", self.host,
                                          "--port", str(self.port)], stdin=subprocess.PIPE, stderr=err,
                                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        finally:
            if self.log_path:
                err.close()
        self.proc.stdin.write(json.dumps(self.settings).encode())
        self.proc.stdin.close()
        deadline = time.time() + self.start_timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API process exited with code {self.proc.returncode} before it was up")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
                    last = f"/healthz answered {r.status}"
            except (urllib.error.URLError, OSError) as e:  # not listening yet
                last = f"{type(e).__name__}: {e}"
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the API process did not answer on {self.url} within {self.start_timeout} s "
                                   f"({last})")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "APIProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the HTTP API alone (no Triton) with APISettings read as JSON "
                                             "from stdin; the Triton it talks to is settings.triton_url.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    import uvicorn

    from serving.api import APISettings, create_app
    from serving.cli import json_logging

    json_logging()
    settings = APISettings(**json.loads(sys.stdin.read()))
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP API under uvicorn in a background thread of this process (demo, benchmarks, tests)."""

from __future__ import annotations

import threading
import time


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

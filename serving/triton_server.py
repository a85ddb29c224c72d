"""Start and stop a real Triton Inference Server on loopback.

Locally: the `tritonserver` binary bundled in the nvidia-pytriton wheel (Triton 2.51, python backend only).
In NVIDIA's container: /opt/tritonserver/bin/tritonserver with every backend. The environment traps of the
bundled binary are handled here: the python-backend stub must find THIS interpreter's libpython first on
LD_LIBRARY_PATH and this venv's `python3` first on PATH; a stub copied out of the wheel needs the wheel's
bundled libraries; a killed server leaves /dev/shm regions behind.

Locked down: Triton loads the chosen models at start and nothing later. It runs with model control mode
`none` on a private view of the repository (links to the chosen models only), so load/unload requests are
refused whatever they carry; the model-repository, shared-memory, trace and logging APIs additionally need a
random per-start key (HTTP header and gRPC metadata `onestep-admin-key`) that only this object knows (it is
in Triton's argv, so on a shared host mount /proc with hidepid=2 to hide it from other users). Secrets of the
API (ONESTEP_API_KEY, ONESTEP_API_KEY_FILE) are removed from Triton's environment.

Response cache: with `response_cache_bytes` > 0 Triton starts with its local (in-memory, bounded) response cache
of that size (`--cache-config local,size=N`, the cache library from the `caches` folder beside the backends:
the wheel ships `caches/local`), used by the models whose config enables `response_cache`. Off by default,
so benchmarks measure the models, not the cache; `onestep serve` turns it on.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "onestep-admin-key"
SECRET_ENV = ("ONESTEP_API_KEY", "ONESTEP_API_KEY_FILE")


class TritonError(RuntimeError):
    """The Triton server could not be found, started or made ready."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pytriton_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver() -> tuple[Path, Path, Path, dict]:
    """(binary, backend directory, cache directory, extra env). Prefers $TRITONSERVER_BIN, then NVIDIA's
    container layout, then the binary inside the nvidia-pytriton wheel (with a python backend folder assembled
    next to it)."""
    env: dict[str, str] = {}
    explicit = os.environ.get("TRITONSERVER_BIN")
    if explicit:
        b = Path(explicit)
        return (b, Path(os.environ.get("TRITONSERVER_BACKENDS", b.parent.parent / "backends")),
                Path(os.environ.get("TRITONSERVER_CACHES", b.parent.parent / "caches")), env)
    container = Path("/opt/tritonserver/bin/tritonserver")
    if container.exists():
        return container, Path("/opt/tritonserver/backends"), Path("/opt/tritonserver/caches"), env
    root = _pytriton_root()
    if root is None or not (root / "tritonserver" / "bin" / "tritonserver").exists():
        raise TritonError("no tritonserver binary: pip install nvidia-pytriton==0.7.0 (bundles Triton 2.51 with "
                          "the python backend) or run inside nvcr.io/nvidia/tritonserver")
    ts = root / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = ts / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonError(f"nvidia-pytriton has no python-backend stub for Python {pyver}")
    backends = Path(os.environ.get("ONESTEP_CACHE", Path.home() / ".cache" / "onestep")) / f"triton-backends-{pyver}"
    pyb = backends / "python"
    if not (pyb / "triton_python_backend_stub").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-backends-", dir=backends.parent if backends.parent.exists() else None))
        (tmp / "python").mkdir()
        for f in (ts / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / "python" / f.name)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        backends.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, backends)
        except OSError:  # another process assembled it first
            shutil.rmtree(tmp, ignore_errors=True)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent / "nvidia_pytriton.libs"), str(ts / "lib")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [os.environ.get("LD_LIBRARY_PATH", "")])
    return ts / "bin" / "tritonserver", backends, ts / "caches", env


def _shm_regions() -> set[str]:
    return set(glob.glob("/dev/shm/triton_python_backend_shm_region_*"))


class TritonServer:
    """Context manager: `with TritonServer(repo, models=[...]) as ts: ts.http_url`."""

    def __init__(self, repository: str | Path, models: list[str] | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, ready_timeout: float = 120.0,
                 log_path: str | Path | None = None, verbose: int = 0, response_cache_bytes: int = 0):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonError(f"model repository {self.repository} does not exist")
        if models is None:
            manifest = self.repository / "repository.json"
            if manifest.exists():
                all_models = json.loads(manifest.read_text())["models"]
                local = not Path("/opt/tritonserver/bin/tritonserver").exists()
                models = [m for m, v in all_models.items() if v.get("local") or not local]
        self.models = models
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.verbose = verbose
        if response_cache_bytes < 0:
            raise TritonError(f"response cache size must be >= 0 bytes, not {response_cache_bytes}")
        self.response_cache_bytes = int(response_cache_bytes)
        self.proc: subprocess.Popen | None = None
        self._shm_before: set[str] = set()
        self.admin_key = secrets.token_hex(24)
        self._view: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _repository_view(self) -> Path:
        """The repository Triton sees: links to the chosen models only (all of them when none were chosen)."""
        if self.models is None:
            return self.repository
        if self._view is None or not self._view.exists():
            self._view = Path(tempfile.mkdtemp(prefix="onestep-triton-repo-"))
        for m in self.models:
            src = self.repository / m
            if not src.is_dir():
                raise TritonError(f"model {m!r} is not in {self.repository}")
            link = self._view / m
            if not link.exists():
                link.symlink_to(src, target_is_directory=True)
        return self._view

    def command(self) -> tuple[list[str], dict]:
        binary, backends, caches, extra_env = find_tritonserver()
        restricted = ",".join(RESTRICTED_APIS) + f":{ADMIN_HEADER}={self.admin_key}"
        cmd = [str(binary), f"--model-repository={self._repository_view()}", f"--backend-directory={backends}",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={self.http_port}",
               f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
               "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.verbose}",
               "--exit-timeout-secs=10", "--model-control-mode=none", "--metrics-address=127.0.0.1",
               f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if self.response_cache_bytes:
            if not (caches / "local" / "libtritoncache_local.so").exists():
                raise TritonError(f"no local response cache library under {caches} (local/libtritoncache_local.so); "
                                  f"start without the response cache or set TRITONSERVER_CACHES")
            cmd += [f"--cache-directory={caches}", f"--cache-config=local,size={self.response_cache_bytes}"]
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.update(extra_env)
        # the stub finds the interpreter (and so this venv's packages) through `python3` on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return cmd, env

    def start(self) -> "TritonServer":
        cmd, env = self.command()
        self._shm_before = _shm_regions()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonError(f"tritonserver exited with code {self.proc.returncode} before it was ready:\n"
                                  f"{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {timeout:.0f} s (killed):\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group (used by fault tests); leftovers are cleaned by stop()."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        for region in _shm_regions() - self._shm_before:
            try:
                os.unlink(region)
            except OSError:
                pass
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if self._view is not None:
            shutil.rmtree(self._view, ignore_errors=True)
            self._view = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

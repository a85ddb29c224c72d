"""Clients: `TritonImageClient` talks to Triton directly (HTTP or gRPC, tritonclient); `APIClient` talks to
the HTTP image API. Both return uint8 arrays (N, C, H, W). No torch."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np


class TritonUnavailable(RuntimeError):
    """Triton cannot be reached, or the model is not loaded/ready (retrying later may work)."""


class TritonTimeout(RuntimeError):
    """The call passed its deadline."""


class TritonFailed(RuntimeError):
    """Triton answered with an error for this request (the text is for logs, not for end users)."""


_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED", "StatusCode.UNKNOWN",
                "StatusCode.RESOURCE_EXHAUSTED", "503", "404", "429"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED", "504", "408"}


def classify(exc: BaseException) -> RuntimeError:
    """tritonclient's exception (or a socket error) -> TritonUnavailable | TritonTimeout | TritonFailed, by the
    status Triton or the transport reports, never by message text."""
    if isinstance(exc, (TritonUnavailable, TritonTimeout, TritonFailed)):
        return exc
    status = None
    if hasattr(exc, "status"):
        try:
            status = exc.status()
        except Exception:  # noqa: BLE001
            status = None
    status = str(status) if status is not None else None
    if status in _TIMEOUT or isinstance(exc, TimeoutError):
        return TritonTimeout(str(exc))
    if status in _UNAVAILABLE or isinstance(exc, (ConnectionError, OSError)) or \
            (status is None and type(exc).__name__ == "InferenceServerException"):
        return TritonUnavailable(str(exc))
    return TritonFailed(str(exc))


class TritonImageClient:
    """SEED[, LABEL] -> IMAGE against a generated model repository served by Triton."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 60.0):
        if protocol not in ("http", "grpc"):
            raise ValueError("protocol must be http or grpc")
        self.protocol = protocol
        self.timeout_s = timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self.tc = tc
        self.client = tc.InferenceServerClient(url, **({"network_timeout": timeout_s, "connection_timeout": timeout_s}
                                                       if protocol == "http" else {}))

    def generate(self, model: str, seeds: Sequence[int], labels: Sequence[int] | None = None,
                 request_id: str = "", timeout_s: float | None = None) -> np.ndarray:
        """Images for the seeds; failures raise TritonUnavailable, TritonTimeout or TritonFailed."""
        try:
            return self._generate(model, seeds, labels, request_id, timeout_s)
        except Exception as e:  # noqa: BLE001
            raise classify(e) from e

    def _generate(self, model, seeds, labels, request_id, timeout_s) -> np.ndarray:
        tc = self.tc
        seeds_a = np.asarray(seeds, dtype=np.int64).reshape(-1, 1)
        inputs = [tc.InferInput("SEED", list(seeds_a.shape), "INT64")]
        inputs[0].set_data_from_numpy(seeds_a)
        if labels is not None:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1, 1)
            inputs.append(tc.InferInput("LABEL", list(lab.shape), "INT64"))
            inputs[1].set_data_from_numpy(lab)
        outputs = [tc.InferRequestedOutput("IMAGE")]
        kw = {"client_timeout": timeout_s or self.timeout_s} if self.protocol == "grpc" else {}
        if timeout_s and self.protocol == "http":  # Triton-side deadline, in microseconds
            kw["timeout"] = int(timeout_s * 1e6)
        return self.client.infer(model, inputs, outputs=outputs, request_id=request_id, **kw).as_numpy("IMAGE")

    def ready(self, model: str | None = None, timeout_s: float | None = None) -> bool:
        kw = {"client_timeout": timeout_s} if timeout_s and self.protocol == "grpc" else {}
        try:
            return bool(self.client.is_model_ready(model, **kw) if model else self.client.is_server_ready(**kw))
        except Exception:  # connection refused / unavailable
            return False

    def close(self) -> None:
        self.client.close()


class APIError(RuntimeError):
    def __init__(self, status: int, detail):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class APIClient:
    """Client of the HTTP image API (`onestep serve`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 60.0):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _req(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("X-API-Key", self.api_key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                detail = json.loads(payload).get("detail")
            except (json.JSONDecodeError, AttributeError):
                detail = payload.decode(errors="replace")
            raise APIError(e.code, detail) from None

    def models(self) -> list[dict]:
        return json.loads(self._req("GET", "/v1/models")[2])["models"]

    def generate(self, model: str, seeds: Sequence[int], labels: Sequence[int] | int | None = None) -> np.ndarray:
        """Raw uint8 images (N, C, H, W) for the given seeds (and labels)."""
        body: dict = {"model": model, "seeds": list(map(int, seeds)), "format": "raw"}
        if labels is not None:
            body["labels" if not isinstance(labels, int) else "label"] = labels if isinstance(labels, int) \
                else list(map(int, labels))
        out = json.loads(self._req("POST", "/v1/generate", body)[2])
        return np.stack([np.frombuffer(base64.b64decode(im["data"]), dtype=np.uint8).reshape(im["shape"])
                         for im in out["images"]])

    def generate_png(self, model: str, seed: int, label: int | None = None) -> bytes:
        body = {"model": model, "seeds": [seed], "format": "png", "response": "image"}
        if label is not None:
            body["label"] = label
        return self._req("POST", "/v1/generate", body)[2]

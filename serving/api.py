"""HTTP image API in front of Triton (FastAPI). No torch.

Endpoints: POST /v1/generate, GET /v1/models, GET /healthz (liveness), GET /readyz (Triton and models ready),
GET /metrics (Prometheus), GET / (a small page), GET /openapi.json.
Protection: request-body limit, images-per-request limit, per-request timeout (504), bounded in-flight work
(429 with Retry-After when full), Triton unreachable -> 503 with Retry-After (and recovery when it returns),
optional API key (X-API-Key or Authorization: Bearer), localhost binding by default (see `onestep serve`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, field_validator, model_validator

from onestep.images import encode_image
from onestep.noise import MAX_SEED

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encodable_formats(channels: int) -> list[str]:
    """Image encodings that carry `channels` channels (1 grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA)."""
    return {1: ["png", "jpeg", "webp"], 3: ["png", "jpeg", "webp"], 2: ["png", "webp"],
            4: ["png", "webp"]}.get(channels, [])


@dataclass
class APISettings:
    triton_url: str = "127.0.0.1:8001"  # gRPC
    repository: str | None = None  # model repository (for repository.json: roles, classes, shapes)
    models: dict = field(default_factory=dict)  # name -> manifest entry; read from repository.json if empty
    served: list[str] | None = None  # the models Triton was told to load (None = every python-backend model)
    max_images: int = 64
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 30.0
    max_inflight: int = 32
    retry_after_s: int = 1
    api_key: str | None = None


class GenerateRequest(BaseModel):
    model: str = Field(..., description="served model name (GET /v1/models)", min_length=1, max_length=64,
                       pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    n: int | None = Field(None, ge=1, description="number of images (seeds seed..seed+n-1); default 1 or len(seeds)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="first seed (default 0)")
    seeds: list[int] | None = Field(None, min_length=1, description="explicit seeds, one image each")
    label: int | None = Field(None, ge=0, description="class label for every image")
    labels: list[int] | None = Field(None, min_length=1, description="one class label per image")
    format: Literal["png", "jpeg", "webp", "raw"] = "png"
    response: Literal["json", "image"] = Field("json", description="'image' returns the picture itself (n = 1)")

    @field_validator("seeds")
    @classmethod
    def _seeds_range(cls, v):
        if v is not None and any(s < 0 or s > MAX_SEED for s in v):
            raise ValueError(f"seeds must lie in [0, {MAX_SEED}]")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_nonneg(cls, v):
        if v is not None and any(x < 0 for x in v):
            raise ValueError("labels must be non-negative")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.seeds is not None and (self.seed is not None or self.n is not None):
            raise ValueError("give either seeds, or seed and n, not both")
        if self.label is not None and self.labels is not None:
            raise ValueError("give either label or labels, not both")
        count = len(self.seeds) if self.seeds is not None else (self.n or 1)
        if self.labels is not None and len(self.labels) != count:
            raise ValueError(f"labels has {len(self.labels)} entries for {count} images")
        if self.response == "image" and (count != 1 or self.format == "raw"):
            raise ValueError("response='image' needs exactly one image in png, jpeg or webp")
        return self

    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return self.seeds
        start = self.seed or 0
        n = self.n or 1
        if start + n - 1 > MAX_SEED:
            raise ValueError("seed + n exceeds the seed range")
        return list(range(start, start + n))


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("onestep_requests_total", "HTTP generate requests", ["model", "status"],
                                registry=self.registry)
        self.images = Counter("onestep_images_total", "images generated", ["model"], registry=self.registry)
        self.errors = Counter("onestep_errors_total", "failed requests by reason", ["reason"], registry=self.registry)
        self.latency = Histogram("onestep_request_seconds", "generate latency (s)", ["model"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.inflight = Gauge("onestep_inflight_requests", "generate requests in flight (queue depth)",
                              registry=self.registry)


def create_app(settings: APISettings) -> FastAPI:
    from serving.client import TritonImageClient

    if not settings.models and settings.repository:
        manifest = json.loads((Path(settings.repository) / "repository.json").read_text())
        settings.models = {k: v for k, v in manifest["models"].items() if v["backend"] == "python"
                           and (settings.served is None or k in settings.served)}
    app = FastAPI(title="OneStep image API", version="1", description=__doc__)
    metrics = Metrics()
    state = {"client": None, "sem": asyncio.Semaphore(settings.max_inflight), "inflight": 0}
    app.state.settings, app.state.metrics = settings, metrics

    def client() -> TritonImageClient:
        if state["client"] is None:
            state["client"] = TritonImageClient(settings.triton_url, "grpc", timeout_s=settings.request_timeout_s)
        return state["client"]

    def err(status: int, detail: str, reason: str, retry: bool = False) -> JSONResponse:
        metrics.errors.labels(reason).inc()
        headers = {"Retry-After": str(settings.retry_after_s)} if retry else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return err(411, "Content-Length required", "no_length")
            if int(length) > settings.max_body_bytes:
                return err(413, f"request body over {settings.max_body_bytes} bytes", "too_large")
        if settings.api_key and request.url.path not in ("/", "/healthz", "/openapi.json", "/docs"):
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = given or auth[7:]
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return err(401, "missing or wrong API key (X-API-Key header)", "auth")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/healthz", summary="liveness: the API process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: Triton and every listed model are ready")
    async def readyz():
        c = client()
        ok = await asyncio.to_thread(c.ready)
        models = {m: (await asyncio.to_thread(c.ready, m)) if ok else False for m in settings.models}
        body = {"triton": ok, "models": models}
        if not ok or not all(models.values()):
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        return body

    @app.get("/v1/models", summary="served models with their classes, shapes and NFE")
    async def models():
        return {"models": [{"name": k, **{f: v.get(f) for f in ("role", "num_classes", "image_shape", "nfe",
                                                                 "method", "sampler", "steps")}}
                           for k, v in settings.models.items()]}

    @app.get("/metrics", include_in_schema=False)
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate", summary="generate images from seeds (and class labels)",
              responses={200: {"content": {"image/png": {}, "application/json": {}}},
                         400: {"description": "invalid request"}, 404: {"description": "unknown model"},
                         413: {"description": "body too large"}, 429: {"description": "too many requests in flight"},
                         503: {"description": "Triton unavailable"}, 504: {"description": "timed out"}})
    async def generate(req: GenerateRequest):
        t0 = time.perf_counter()
        info = settings.models.get(req.model)
        if info is None:
            metrics.requests.labels("unknown", "404").inc()
            return err(404, f"unknown model {req.model!r}; available: {sorted(settings.models)}", "unknown_model")
        shape = info.get("image_shape") or [1]
        if req.format != "raw" and req.format not in encodable_formats(int(shape[0])):
            metrics.requests.labels(req.model, "400").inc()
            return err(400, f"model {req.model!r} makes {shape[0]}-channel images, which {req.format} cannot hold; "
                            f"use one of {encodable_formats(int(shape[0])) + ['raw']}", "bad_format")
        try:
            seeds = req.seed_list()
        except ValueError as e:
            return err(400, str(e), "bad_seeds")
        if len(seeds) > settings.max_images:
            return err(400, f"at most {settings.max_images} images per request, asked for {len(seeds)}", "too_many")
        n_cls = int(info.get("num_classes") or 0)
        labels = None
        if n_cls:
            labels = req.labels if req.labels is not None else \
                [req.label] * len(seeds) if req.label is not None else [s % n_cls for s in seeds]
            bad = [x for x in labels if x >= n_cls]
            if bad:
                return err(400, f"label {bad[0]} out of range: model {req.model!r} has classes 0..{n_cls - 1}",
                           "bad_label")
        elif req.label is not None or req.labels is not None:
            return err(400, f"model {req.model!r} is unconditional: do not send labels", "bad_label")
        if state["sem"].locked():
            metrics.requests.labels(req.model, "429").inc()
            return err(429, "too many requests in flight; retry later", "busy", retry=True)
        async with state["sem"]:
            metrics.inflight.inc()
            try:
                images = await asyncio.wait_for(asyncio.to_thread(client().generate, req.model, seeds, labels),
                                                timeout=settings.request_timeout_s)
            except asyncio.TimeoutError:
                metrics.requests.labels(req.model, "504").inc()
                return err(504, f"generation took longer than {settings.request_timeout_s} s", "timeout")
            except Exception as e:  # tritonclient raises InferenceServerException for every failure
                msg = str(e)
                unavailable = any(s in msg.lower() for s in ("unavailable", "connect", "refused", "deadline",
                                                             "socket closed", "not ready", "unknown model"))
                status = 503 if unavailable else 502
                metrics.requests.labels(req.model, str(status)).inc()
                return err(status, f"Triton: {msg}", "triton_unavailable" if unavailable else "triton_error",
                           retry=unavailable)
            finally:
                metrics.inflight.dec()
        t_model = time.perf_counter()
        if req.response == "image":
            body = encode_image(images[0].transpose(1, 2, 0), req.format)
            _done(metrics, req.model, len(seeds), t0)
            return Response(body, media_type=MEDIA[req.format],
                            headers={"X-Seed": str(seeds[0]), "X-Label": str(labels[0] if labels else "")})
        out = []
        for i, s in enumerate(seeds):
            if req.format == "raw":
                data = images[i].tobytes()
            else:
                data = encode_image(images[i].transpose(1, 2, 0), req.format)
            out.append({"seed": s, "label": labels[i] if labels else None, "format": req.format,
                        "shape": list(images[i].shape), "dtype": "uint8", "data": base64.b64encode(data).decode()})
        _done(metrics, req.model, len(seeds), t0)
        return {"model": req.model, "images": out,
                "timings_ms": {"triton": (t_model - t0) * 1e3, "encode": (time.perf_counter() - t_model) * 1e3}}

    @app.exception_handler(HTTPException)
    async def http_exc(request, exc):  # keep every error as {"detail": ...}
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    return app


def _done(metrics: Metrics, model: str, n: int, t0: float) -> None:
    metrics.requests.labels(model, "200").inc()
    metrics.images.labels(model).inc(n)
    metrics.latency.labels(model).observe(time.perf_counter() - t0)

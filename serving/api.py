"""HTTP image API in front of Triton (FastAPI). No torch.

Endpoints: POST /v1/generate, GET /v1/models, GET /healthz (liveness), GET /readyz (Triton and models ready),
GET /metrics (Prometheus, this process), GET /metrics/triton (Triton's own metrics, proxied), GET / (a small
page: the one-step student beside a multi-step teacher, same seed and class, each with its latency; its script
and style at /static/, under a strict Content-Security-Policy), GET /openapi.json.

Protection: every bound of a request (images per request, seed and label ranges, seeds vs seed+n, label vs
labels, image responses) is part of the OpenAPI schema and checked before anything is allocated; request-body
limit; per-request timeout (504) passed down to the Triton call; bounded in-flight work on a dedicated thread
pool of the same size (429 with Retry-After when full); Triton unreachable -> 503 with Retry-After (and
recovery when it returns); a watcher polls Triton, readiness is answered from its last result, and liveness
fails once Triton has been unreachable for `triton_dead_after_s`; optional API key (X-API-Key or
Authorization: Bearer). Every response carries X-Request-ID (the client's, if it sent a sane one), which is
also Triton's request id; every error body is {"detail": ..., "request_id": ...}; internal error text goes to
the log only. Access logs are JSON lines on the `onestep.access` logger.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import re
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from onestep.images import encode_image
from onestep.noise import MAX_SEED

STATIC = Path(__file__).resolve().parent / "static"
PAGE = STATIC / "index.html"
PAGE_ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# the page loads only its own script and style and talks only to this API; images arrive as data: URLs
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
OPEN_PATHS = ("/", "/healthz", "/openapi.json", "/docs") + tuple(f"/static/{name}" for name in PAGE_ASSETS)
log = logging.getLogger("onestep.api")
access_log = logging.getLogger("onestep.access")


def class_names(info: dict) -> list[str]:
    """A served model's class names: from its repository manifest entry (`onestep export onnx` records them from
    the checkpoint's metadata), else `class k`; none for an unconditional model."""
    n = int(info.get("num_classes") or 0)
    names = info.get("class_names")
    if isinstance(names, list) and len(names) == n:
        return [str(x) for x in names]
    return [f"class {k}" for k in range(n)]


_FORMATS = {1: ("png", "jpeg", "webp"), 3: ("png", "jpeg", "webp"), 2: ("png", "webp"), 4: ("png", "webp")}


def encodable_formats(channels: int) -> list[str]:
    """Image encodings that carry `channels` channels (1 grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA)."""
    return list(_FORMATS.get(channels, ()))


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
    triton_metrics_url: str | None = None  # host:port of Triton's metrics endpoint (proxied at /metrics/triton)
    watch_interval_s: float = 1.0
    triton_dead_after_s: float = 30.0  # /healthz fails once Triton has been unreachable this long


class ErrorBody(BaseModel):
    detail: Any = Field(..., description="what went wrong (a message, or the list of validation errors)")
    request_id: str = Field(..., description="also in the X-Request-ID response header and in the logs")


def _schema_rules(max_images: int, models: dict) -> dict:
    """The request rules pydantic fields cannot state alone, written as JSON Schema (OpenAPI 3.1)."""
    def count_is(k: int) -> list[dict]:
        ways = [{"required": ["seeds"], "properties": {"seeds": {"minItems": k, "maxItems": k}}},
                {"not": {"required": ["seeds"]}, "required": ["n"], "properties": {"n": {"const": k}}}]
        if k == 1:
            ways.append({"not": {"anyOf": [{"required": ["seeds"]}, {"required": ["n"]}]}})
        return ways

    rules: list[dict] = [
        {"not": {"required": ["seeds", "seed"]}},
        {"not": {"required": ["seeds", "n"]}},
        {"not": {"required": ["label", "labels"]}},
        {"if": {"required": ["labels"]},
         "then": {"anyOf": [{"properties": {"labels": {"minItems": k, "maxItems": k}}, "anyOf": count_is(k)}
                            for k in range(1, max_images + 1)]}},
        {"if": {"required": ["response"], "properties": {"response": {"const": "image"}}},
         "then": {"properties": {"format": {"enum": list(MEDIA)}}, "anyOf": count_is(1)}},
    ]
    if models:
        per_model = []
        for name, info in sorted(models.items()):
            channels = int((info.get("image_shape") or [1])[0])
            branch: dict = {"properties": {"model": {"const": name},
                                           "format": {"enum": encodable_formats(channels) + ["raw"]}}}
            n_cls = int(info.get("num_classes") or 0)
            if n_cls:
                branch["properties"]["label"] = {"maximum": n_cls - 1}
                branch["properties"]["labels"] = {"items": {"maximum": n_cls - 1}}
            else:
                branch["not"] = {"anyOf": [{"required": ["label"]}, {"required": ["labels"]}]}
            per_model.append(branch)
        rules.append({"anyOf": per_model})
    return {"allOf": rules}


def server_timing(ms: dict[str, float]) -> str:
    """The W3C Server-Timing header: 'parse;dur=0.120, triton;dur=7.900, ...' (milliseconds)."""
    return ", ".join(f"{k};dur={v:.3f}" for k, v in ms.items())


def _json_integer(value):
    """JSON Schema's integer: 3 and 3.0 are, true/false and "3" are not (a lax int would read false as 0)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("must be a JSON integer, not a boolean or a string")
    return value


JSONInt = Annotated[int, BeforeValidator(_json_integer)]


def request_model(max_images: int, models: dict) -> type[BaseModel]:
    """The request body type of one app: its bounds (max_images, the served models) are in the schema."""
    first_seed_max = MAX_SEED - max_images + 1
    rules = _schema_rules(max_images, models)
    names = sorted(models)

    def extra(schema: dict) -> None:
        schema.update(rules)
        if names:
            schema["properties"]["model"]["enum"] = names

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra=extra)

        model: str = Field(..., description="served model name (GET /v1/models)", min_length=1, max_length=64,
                           pattern=r"^[a-z0-9][a-z0-9_\-]*$")
        n: JSONInt = Field(None, ge=1, le=max_images,
                             description="number of images (seeds seed..seed+n-1); default 1. Not with seeds")
        seed: JSONInt = Field(None, ge=0, le=first_seed_max, description="first seed (default 0). Not with seeds")
        seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_json_integer)]] = Field(
            None, min_length=1, max_length=max_images, description="explicit seeds, one image each")
        label: JSONInt = Field(None, ge=0,
                                 description="class label for every image (below the model's num_classes; "
                                             "not for unconditional models). Not with labels")
        labels: list[Annotated[int, Field(ge=0), BeforeValidator(_json_integer)]] = Field(
            None, min_length=1, max_length=max_images, description="one class label per image (as many as images)")
        format: Literal["png", "jpeg", "webp", "raw"] = "png"
        response: Literal["json", "image"] = Field(
            "json", description="'image' returns the picture itself: exactly one image, png/jpeg/webp")

        @model_validator(mode="after")
        def _consistent(self):
            if self.seeds is not None and (self.seed is not None or self.n is not None):
                raise ValueError("give either seeds, or seed and n, not both")
            if self.label is not None and self.labels is not None:
                raise ValueError("give either label or labels, not both")
            count = self.count()
            if self.labels is not None and len(self.labels) != count:
                raise ValueError(f"labels has {len(self.labels)} entries for {count} images")
            if self.response == "image" and (count != 1 or self.format == "raw"):
                raise ValueError("response='image' needs exactly one image in png, jpeg or webp")
            return self

        def count(self) -> int:
            return len(self.seeds) if self.seeds is not None else (self.n or 1)

        def seed_list(self) -> list[int]:  # bounded by max_images through the schema
            if self.seeds is not None:
                return list(self.seeds)
            start = self.seed or 0
            return list(range(start, start + (self.n or 1)))

    return GenerateRequest


class Metrics:
    def __init__(self):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                                       ProcessCollector)

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter("onestep_requests_total", "HTTP requests by handler, method and status code",
                                ["handler", "method", "code"], registry=self.registry)
        self.latency = Histogram("onestep_request_duration_seconds", "HTTP request duration",
                                 ["handler", "method", "code"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.images = Counter("onestep_images_total", "images generated", ["model"], registry=self.registry)
        self.errors = Counter("onestep_errors_total", "failed requests by reason", ["reason"], registry=self.registry)
        self.inflight = Gauge("onestep_inflight_requests", "generate requests in flight", registry=self.registry)
        self.triton_up = Gauge("onestep_triton_up", "1 when the watcher last reached a live Triton",
                               registry=self.registry)


class APIFailure(Exception):
    """An error answered to the client: status, a message fit for the client, a metrics reason."""

    def __init__(self, status: int, detail: Any, reason: str, retry: bool = False):
        super().__init__(detail)
        self.status, self.detail, self.reason, self.retry = status, detail, reason, retry


def _request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def _clean_validation(errors) -> list[dict]:
    """pydantic's errors without the echoed input or internal context objects."""
    out = []
    for e in errors:
        item = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        out.append(item)
    return out


FRAME_HEADERS = (b"x-request-id", b"content-length", b"x-api-key", b"authorization")  # what the frame reads


def _url_path(path: str) -> str:
    """The ASGI path as `request.url.path` reports it (the form the key check and the access log use): '?', '#'
    and backslash percent-escaped, a leading '/' ensured, then tab, CR and LF dropped."""
    path = path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
    if path and path[0] != "/":
        path = "/" + path
    if "\t" in path or "\r" in path or "\n" in path:
        path = path.replace("\t", "").replace("\r", "").replace("\n", "")
    return path


def _set_header(headers, name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers with `name` set to `value`: the first one replaced in place, any others dropped, else
    appended."""
    out, done = [], False
    for k, v in headers:
        if k.lower() == name:
            if not done:
                out.append((name, value))
                done = True
        else:
            out.append((k, v))
    if not done:
        out.append((name, value))
    return out


class RequestFrame:
    """Plain ASGI middleware around every HTTP request, routed or not (404s, 405s and validation errors too):
    the request id (the client's sane X-Request-ID, else a new one; kept in scope["state"] for the handlers),
    the body-length and API-key guard, X-Request-ID on every response, the request counter and latency
    histogram, the JSON access log line, and a 500 {"detail": "internal error", "request_id": ...} for anything
    a handler raised that nothing else answered (the error itself goes to the log only).

    It calls the app directly with the same scope and a send wrapper: no extra task, no body streams."""

    def __init__(self, app, *, settings: APISettings, metrics: Metrics, error_response):
        self.app, self.settings, self.metrics, self.error_response = app, settings, metrics, error_response
        self.series: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # (handler, method, code) -> children

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        wanted: dict[bytes, str | None] = dict.fromkeys(FRAME_HEADERS)
        for k, v in scope["headers"]:  # the first of each, as request.headers.get gives it
            if k in wanted and wanted[k] is None:
                wanted[k] = v.decode("latin-1")
        given_id, length, api_key, auth = wanted.values()
        rid = given_id if given_id is not None and REQUEST_ID.match(given_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = rid.encode("latin-1")
        method = scope["method"]
        status = None

        async def send_framed(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message)
                message["headers"] = _set_header(message.get("headers") or (), b"x-request-id", rid_header)
            await send(message)

        try:
            refusal = self.guard(method, scope["path"], length, api_key, auth, rid)
            if refusal is None:
                await self.app(scope, receive, send_framed)
            else:
                await refusal(scope, receive, send_framed)
            if status is None:
                raise RuntimeError("the app returned without starting a response")
        except Exception:
            log.exception(json.dumps({"event": "unhandled", "request_id": rid}))
            if status is not None:  # the response has begun: nothing sane can follow; the server closes it
                self.record(scope, method, status, t0, rid)
                raise
            await self.error_response(rid, 500, "internal error", "internal")(scope, receive, send_framed)
        self.record(scope, method, status, t0, rid)

    def guard(self, method: str, path: str, length: str | None, api_key: str | None, auth: str | None,
              rid: str) -> Response | None:
        settings = self.settings
        if method == "POST":
            if length is None or not (length.isascii() and length.isdigit()):
                return self.error_response(rid, 411, "Content-Length required", "no_length")
            if int(length) > settings.max_body_bytes:
                return self.error_response(rid, 413, f"request body over {settings.max_body_bytes} bytes",
                                           "too_large")
        if settings.api_key and _url_path(path) not in OPEN_PATHS:
            given = api_key or ""
            auth = auth or ""
            if auth.lower().startswith("bearer "):
                given = given or auth[7:]
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return self.error_response(rid, 401, "missing or wrong API key (X-API-Key header)", "auth")
        return None

    def record(self, scope, method: str, status: int, t0: float, rid: str) -> None:
        dt = time.perf_counter() - t0
        route = scope.get("route")  # set by the router on the shared scope; none for 404s and guard refusals
        # the method is client text: only the standard ones become label values (bounded series)
        key = (getattr(route, "path", None) or "other", method if method in METRIC_METHODS else "other", str(status))
        series = self.series.get(key)
        if series is None:
            series = (self.metrics.requests.labels(*key), self.metrics.latency.labels(*key))
            if len(self.series) < 4096:
                self.series[key] = series
        series[0].inc()
        series[1].observe(dt)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(json.dumps({"ts": round(time.time(), 3), "request_id": rid, "method": method,
                                        "path": _url_path(scope["path"]), "status": status,
                                        "duration_ms": round(dt * 1e3, 2), "client": client[0] if client else None}))


def create_app(settings: APISettings) -> FastAPI:
    from serving.client import TritonFailed, TritonImageClient, TritonTimeout, TritonUnavailable

    if not settings.models and settings.repository:
        manifest = json.loads((Path(settings.repository) / "repository.json").read_text())
        settings.models = {k: v for k, v in manifest["models"].items() if v["backend"] == "python"
                           and (settings.served is None or k in settings.served)}
    if settings.max_images < 1 or settings.max_inflight < 1:
        raise ValueError("max_images and max_inflight must be at least 1")
    metrics = Metrics()
    GenerateRequest = request_model(settings.max_images, settings.models)
    state: dict[str, Any] = {"sem": asyncio.Semaphore(settings.max_inflight), "stopping": False,
                             "triton": False, "models": {m: False for m in settings.models},
                             "last_live": time.monotonic(), "watch": None}
    pool = ThreadPoolExecutor(settings.max_inflight, thread_name_prefix="onestep-triton")
    side = ThreadPoolExecutor(2, thread_name_prefix="onestep-watch")  # watcher + metrics proxy, never generate
    local = {}

    def client() -> TritonImageClient:  # one gRPC channel for all generate threads
        if "client" not in local:
            local["client"] = TritonImageClient(settings.triton_url, "grpc", timeout_s=settings.request_timeout_s)
        return local["client"]

    def watch_client() -> TritonImageClient:
        if "watch" not in local:
            local["watch"] = TritonImageClient(settings.triton_url, "grpc", timeout_s=2.0)
        return local["watch"]

    def probe() -> tuple[bool, dict]:
        c = watch_client()
        up = c.ready(timeout_s=2.0)
        return up, {m: (c.ready(m, timeout_s=2.0) if up else False) for m in settings.models}

    async def watch_once():
        loop = asyncio.get_running_loop()
        try:
            up, models = await loop.run_in_executor(side, probe)
        except Exception:  # never let the watcher die
            log.exception("triton watcher")
            up, models = False, {m: False for m in settings.models}
        if up:
            state["last_live"] = time.monotonic()
        if up != state["triton"]:
            log.warning(json.dumps({"event": "triton_up" if up else "triton_down", "url": settings.triton_url}))
        state["triton"], state["models"] = up, models
        metrics.triton_up.set(1 if up else 0)

    async def watcher():
        while True:
            await asyncio.sleep(settings.watch_interval_s)
            await watch_once()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await watch_once()
        state["watch"] = asyncio.create_task(watcher())
        try:
            yield
        finally:
            state["watch"].cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            side.shutdown(wait=False, cancel_futures=True)
            for c in local.values():
                with contextlib.suppress(Exception):
                    c.close()

    app = FastAPI(title="OneStep image API", version="1", description=__doc__, lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.runtime = settings, metrics, state

    def begin_stop() -> None:
        """Readiness answers 503 from now on; requests in flight and new ones are still served."""
        state["stopping"] = True

    app.state.begin_stop = begin_stop

    def error_response(rid: str, status: int, detail: Any, reason: str, retry: bool = False) -> JSONResponse:
        metrics.errors.labels(reason).inc()
        headers = {"X-Request-ID": rid}
        if retry:
            headers["Retry-After"] = str(settings.retry_after_s)
        return JSONResponse({"detail": detail, "request_id": rid}, status_code=status, headers=headers)

    app.add_middleware(RequestFrame, settings=settings, metrics=metrics, error_response=error_response)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        for e in errors:  # too many images is the one bound users hit in practice: a plain 400 message
            loc, kind, given = tuple(e.get("loc", ())), e.get("type"), e.get("input")
            if loc == ("body", "n") and kind == "less_than_equal" and isinstance(given, int):
                asked = given
            elif loc in (("body", "seeds"), ("body", "labels")) and kind == "too_long" and isinstance(given, list):
                asked = len(given)
            else:
                continue
            return error_response(_request_id(request), 400, f"at most {settings.max_images} images per request, "
                                                             f"asked for {asked}", "too_many")
        return error_response(_request_id(request), 422, _clean_validation(errors), "invalid")

    @app.exception_handler(StarletteHTTPException)
    async def http_exc(request: Request, exc: StarletteHTTPException):
        resp = error_response(_request_id(request), exc.status_code, exc.detail, "http")
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(APIFailure)
    async def failure(request: Request, exc: APIFailure):
        return error_response(_request_id(request), exc.status, exc.detail, exc.reason, exc.retry)

    err_doc = {"model": ErrorBody}
    common = {401: {**err_doc, "description": "missing or wrong API key"}}

    # the page and its assets are read once, when the app is made: no file I/O per request
    page_html = PAGE.read_text()
    assets = {name: (STATIC / name).read_bytes() for name in PAGE_ASSETS}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html, headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def page_asset(name: str):
        if name not in PAGE_ASSETS:
            raise APIFailure(404, "not found", "not_found")
        return Response(assets[name], media_type=PAGE_ASSETS[name], headers=PAGE_HEADERS)

    @app.get("/healthz", summary="liveness: the API answers and Triton has not been unreachable for long",
             responses={503: {**err_doc, "description": "Triton unreachable for too long: restart me"}})
    async def healthz(request: Request):
        down_for = time.monotonic() - state["last_live"]
        if down_for > settings.triton_dead_after_s:
            raise APIFailure(503, f"Triton unreachable for {down_for:.0f} s", "triton_dead")
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: Triton and every listed model are ready (from the watcher)",
             responses={**common, 503: {"description": "not ready (or stopping)"}})
    async def readyz():
        body = {"triton": state["triton"], "models": dict(state["models"]), "stopping": state["stopping"]}
        if state["stopping"] or not state["triton"] or not all(state["models"].values()):
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        return body

    @app.get("/v1/models", summary="served models with their classes (count and names), shapes and NFE",
             responses=common)
    async def models():
        return {"models": [{"name": k, **{f: v.get(f) for f in ("role", "num_classes", "image_shape", "nfe",
                                                                 "method", "sampler", "steps")},
                            "class_names": class_names(v)}
                           for k, v in settings.models.items()]}

    @app.get("/metrics", include_in_schema=False)
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/triton", include_in_schema=False)
    async def triton_metrics():
        if not settings.triton_metrics_url:
            raise APIFailure(404, "Triton metrics are not configured", "no_triton_metrics")

        def fetch() -> bytes:
            with urllib.request.urlopen(f"http://{settings.triton_metrics_url}/metrics", timeout=5) as r:
                return r.read()

        try:
            body = await asyncio.get_running_loop().run_in_executor(side, fetch)
        except OSError:
            raise APIFailure(503, "Triton metrics unreachable", "triton_unavailable", retry=True) from None
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def run(model: str, seeds: list[int], labels, fmt: str, single: bool, rid: str, t_submit: float):
        """In a pool thread: Triton call (with its own deadline), then encoding, off the event loop. Returns the
        body, and the stage times (s): waiting for a pool thread, the Triton call, encoding."""
        t0 = time.perf_counter()
        images = client().generate(model, seeds, labels, request_id=rid, timeout_s=settings.request_timeout_s)
        t1 = time.perf_counter()
        if single:
            body = encode_image(images[0].transpose(1, 2, 0), fmt)
            return body, None, (t0 - t_submit, t1 - t0, time.perf_counter() - t1)
        out = []
        for i, s in enumerate(seeds):
            data = images[i].tobytes() if fmt == "raw" else encode_image(images[i].transpose(1, 2, 0), fmt)
            out.append({"seed": s, "label": labels[i] if labels else None, "format": fmt,
                        "shape": list(images[i].shape), "dtype": "uint8", "data": base64.b64encode(data).decode()})
        return None, out, (t0 - t_submit, t1 - t0, time.perf_counter() - t1)

    gen_errors = {
        400: {**err_doc, "description": "invalid request for this model"},
        404: {**err_doc, "description": "unknown model"}, 411: {**err_doc, "description": "no Content-Length"},
        413: {**err_doc, "description": "body too large"}, 422: {**err_doc, "description": "invalid request"},
        429: {**err_doc, "description": "too many requests in flight (Retry-After)"},
        500: {**err_doc, "description": "internal error"}, 502: {**err_doc, "description": "Triton failed"},
        503: {**err_doc, "description": "Triton unavailable (Retry-After)"},
        504: {**err_doc, "description": "timed out"}}

    async def generate(req, request: Request):
        t0 = time.perf_counter()
        rid = _request_id(request)
        info = settings.models.get(req.model)
        if info is None:
            raise APIFailure(404, f"unknown model {req.model!r}; available: {sorted(settings.models)}",
                             "unknown_model")
        shape = info.get("image_shape") or [1]
        if req.format != "raw" and req.format not in encodable_formats(int(shape[0])):
            raise APIFailure(400, f"model {req.model!r} makes {shape[0]}-channel images, which {req.format} cannot "
                                  f"hold; use one of {encodable_formats(int(shape[0])) + ['raw']}", "bad_format")
        count = req.count()
        if count > settings.max_images:  # the schema bounds it already; kept as the last line before allocation
            raise APIFailure(400, f"at most {settings.max_images} images per request, asked for {count}", "too_many")
        n_cls = int(info.get("num_classes") or 0)
        if n_cls:
            bad = [x for x in ([req.label] if req.label is not None else req.labels or []) if x >= n_cls]
            if bad:
                raise APIFailure(400, f"label {bad[0]} out of range: model {req.model!r} has classes 0..{n_cls - 1}",
                                 "bad_label")
        elif req.label is not None or req.labels is not None:
            raise APIFailure(400, f"model {req.model!r} is unconditional: do not send labels", "bad_label")
        seeds = req.seed_list()
        labels = None
        if n_cls:
            labels = list(req.labels) if req.labels is not None else \
                [req.label] * count if req.label is not None else [s % n_cls for s in seeds]
        if state["sem"].locked():
            raise APIFailure(429, "too many requests in flight; retry later", "busy", retry=True)
        single = req.response == "image"
        async with state["sem"]:
            metrics.inflight.inc()
            try:
                t_submit = time.perf_counter()
                fut = asyncio.get_running_loop().run_in_executor(pool, run, req.model, seeds, labels, req.format,
                                                                 single, rid, t_submit)
                # the Triton call carries the same deadline and frees its thread when it passes; this is a backstop
                body, out, (t_queue, t_triton, t_encode) = await asyncio.wait_for(fut,
                                                                                  settings.request_timeout_s + 5.0)
            except (asyncio.TimeoutError, TritonTimeout):
                raise APIFailure(504, f"generation took longer than {settings.request_timeout_s} s",
                                 "timeout") from None
            except TritonUnavailable as e:
                log.warning(json.dumps({"event": "triton_unavailable", "request_id": rid, "error": str(e)[:500]}))
                raise APIFailure(503, "the model server is unavailable; retry later", "triton_unavailable",
                                 retry=True) from None
            except TritonFailed as e:
                log.error(json.dumps({"event": "triton_error", "request_id": rid, "error": str(e)[:2000]}))
                raise APIFailure(502, "the model server failed on this request", "triton_error") from None
            finally:
                metrics.inflight.dec()
        metrics.images.labels(req.model).inc(len(seeds))
        # stages of this request, one clock: parse = from the handler's start to the hand-off (checks, seeds,
        # labels), queue = waiting for a pool thread, triton = the gRPC call, encode = images to bytes
        ms = {"parse": (t_submit - t0) * 1e3, "queue": t_queue * 1e3, "triton": t_triton * 1e3,
              "encode": t_encode * 1e3}
        if single:
            ms["total"] = (time.perf_counter() - t0) * 1e3
            return Response(body, media_type=MEDIA[req.format],
                            headers={"X-Seed": str(seeds[0]), "X-Label": str(labels[0] if labels else ""),
                                     "Server-Timing": server_timing(ms)})
        payload = {"model": req.model, "images": out, "request_id": rid, "timings_ms": ms}
        ms["total"] = (time.perf_counter() - t0) * 1e3
        return JSONResponse(payload, headers={"Server-Timing": server_timing(ms)})

    generate.__annotations__.update(req=GenerateRequest, request=Request)  # the per-app body type

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            # FastAPI's OpenAPI model stores bounds as floats (2**63 - 1 would become 2**63): use pydantic's
            # exact schema of the body
            schema["components"]["schemas"]["GenerateRequest"] = GenerateRequest.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.post("/v1/generate", summary="generate images from seeds (and class labels)",
             responses={200: {"description": "JSON with base64 images, or the image itself (response='image')",
                              "content": {"application/json": {}, "image/png": {}, "image/jpeg": {},
                                          "image/webp": {}}}, **common, **gen_errors})(generate)
    return app

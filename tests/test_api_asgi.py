"""The HTTP API's request frame, driven straight through ASGI (no server, no Triton): request ids, the body-length
and API-key guard, error bodies, metrics labels and the access log, for routed and unrouted requests alike."""

import asyncio
import contextlib
import json
import logging
import re

import pytest

KEY = "s3cret"
MODELS = {"tiny": {"backend": "python", "role": "student", "num_classes": 10, "image_shape": [1, 32, 32], "nfe": 1}}


def _app(**kw):
    from serving.api import APISettings, create_app

    # nothing listens at this Triton address; no test here reaches it (no lifespan, no generate call)
    return create_app(APISettings(triton_url="127.0.0.1:1", models=dict(MODELS), watch_interval_s=30, **kw))


async def _acall(app, method, path, headers=(), body=b"", sent=None):
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("10.1.2.3", 40000), "server": ("127.0.0.1", 8000), "state": {},
             "headers": [(b"host", b"api.test")] + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                                    for k, v in headers]}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # the client stays connected

    sent = [] if sent is None else sent

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def call(app, method, path, headers=(), body=b"", json_body=None):
    """(status, raw headers, body bytes) of one request; asserts exactly one response start."""
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]
    sent = asyncio.run(_acall(app, method, path, headers, body))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], list(starts[0]["headers"]), data


def rid_of(headers) -> str:
    values = [v.decode() for k, v in headers if k.lower() == b"x-request-id"]
    assert len(values) == 1, headers  # one X-Request-ID, never two
    return values[0]


def metrics_text(app) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()


@contextlib.contextmanager
def records(name: str):
    """The messages logged on `name` (INFO and above) inside the block, with their exception text."""
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append((record.getMessage(), self.formatter.formatException(record.exc_info)
                        if record.exc_info else ""))

    h = Keep()
    h.setFormatter(logging.Formatter())
    lg = logging.getLogger(name)
    level = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        yield got
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)


def test_the_frame_is_plain_asgi_not_base_http_middleware():
    """BaseHTTPMiddleware runs every request's app in a second task with memory streams for the body."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from serving.api import RequestFrame

    app = _app()
    classes = [m.cls for m in app.user_middleware]
    assert RequestFrame in classes
    assert not any(isinstance(c, type) and issubclass(c, BaseHTTPMiddleware) for c in classes), classes


def test_unhandled_error_is_a_json_500_with_the_request_id_and_no_internal_text():
    app = _app()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal text")

    with records("onestep.api") as logged:
        status, headers, raw = call(app, "GET", "/boom", [("X-Request-ID", "req-500")])
    assert status == 500 and rid_of(headers) == "req-500"
    assert json.loads(raw) == {"detail": "internal error", "request_id": "req-500"}
    assert b"secret" not in raw and b"RuntimeError" not in raw
    [(message, trace)] = [(m, t) for m, t in logged if "unhandled" in m]
    assert json.loads(message) == {"event": "unhandled", "request_id": "req-500"}
    assert "secret internal text" in trace  # the error itself goes to the log
    text = metrics_text(app)
    assert 'onestep_errors_total{reason="internal"} 1.0' in text
    assert 'onestep_requests_total{code="500",handler="/boom",method="GET"} 1.0' in text


def test_an_app_that_never_answers_gets_a_500():
    app = _app()

    async def silent(scope, receive, send):
        return None

    app.mount("/silent", silent)
    status, headers, raw = call(app, "GET", "/silent/x")
    assert status == 500 and json.loads(raw) == {"detail": "internal error", "request_id": rid_of(headers)}


def test_error_after_the_response_started_is_logged_and_raised_without_a_second_start():
    from fastapi.responses import StreamingResponse

    app = _app()

    @app.get("/half")
    async def half():
        async def body():
            yield b"first part"
            raise RuntimeError("broke mid-body")

        return StreamingResponse(body(), media_type="text/plain")

    sent = []
    with records("onestep.api") as logged, pytest.raises(RuntimeError, match="broke mid-body"):
        asyncio.run(_acall(app, "GET", "/half", [("X-Request-ID", "req-half")], sent=sent))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1 and starts[0]["status"] == 200 and rid_of(starts[0]["headers"]) == "req-half"
    assert any(json.loads(m) == {"event": "unhandled", "request_id": "req-half"} for m, _ in logged)
    assert 'onestep_requests_total{code="200",handler="/half",method="GET"} 1.0' in metrics_text(app)


def test_request_id_on_unrouted_and_invalid_requests():
    app = _app()
    status, headers, raw = call(app, "GET", "/nowhere", [("X-Request-ID", "req-404")])
    assert status == 404 and rid_of(headers) == "req-404"
    assert json.loads(raw) == {"detail": "Not Found", "request_id": "req-404"}
    status, headers, raw = call(app, "POST", "/v1/generate", [("X-Request-ID", "req-422")],
                                json_body={"model": "tiny", "bogus": 1})
    body = json.loads(raw)
    assert status == 422 and rid_of(headers) == "req-422" and set(body) == {"detail", "request_id"}
    assert body["request_id"] == "req-422" and "bogus" in json.dumps(body["detail"])
    status, headers, raw = call(app, "GET", "/nowhere", [("X-Request-ID", "bad id <>")])
    assert status == 404 and re.fullmatch(r"[0-9a-f]{32}", rid_of(headers))
    assert json.loads(raw)["request_id"] == rid_of(headers)
    # the first of repeated headers counts, as with request.headers.get
    status, headers, _ = call(app, "GET", "/nowhere", [("X-Request-ID", "one"), ("X-Request-ID", "two")])
    assert rid_of(headers) == "one"
    status, headers, raw = call(app, "GET", "/healthz")
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", rid_of(headers))
    text = metrics_text(app)
    assert 'onestep_requests_total{code="404",handler="other",method="GET"} 3.0' in text
    assert 'onestep_requests_total{code="422",handler="/v1/generate",method="POST"} 1.0' in text
    assert 'onestep_requests_total{code="200",handler="/healthz",method="GET"} 1.0' in text
    assert 'onestep_request_duration_seconds_count{code="404",handler="other",method="GET"} 3.0' in text
    assert 'onestep_errors_total{reason="http"} 3.0' in text and 'onestep_errors_total{reason="invalid"} 1.0' in text


def test_handler_label_of_a_method_not_allowed_is_its_route():
    app = _app()
    status, headers, raw = call(app, "PUT", "/v1/models")
    assert status == 405 and json.loads(raw)["request_id"] == rid_of(headers)
    assert 'onestep_requests_total{code="405",handler="/v1/models",method="PUT"} 1.0' in metrics_text(app)


def test_client_invented_methods_share_one_metric_series():
    """The method label takes the standard methods only: a client cannot grow the registry one series per
    made-up method name."""
    app = _app()
    for i in range(5):
        status, _, _ = call(app, f"BREW{i}", "/v1/models")
        assert status == 405
    text = metrics_text(app)
    assert 'onestep_requests_total{code="405",handler="/v1/models",method="other"} 5.0' in text
    assert "BREW" not in text


def test_guard_body_length_and_api_key():
    app = _app(api_key=KEY, max_body_bytes=100)
    k = [("X-API-Key", KEY)]
    cases = [
        ("POST", "/v1/generate", k, b"{}", 411, "Content-Length required"),
        ("POST", "/v1/generate", k + [("Content-Length", "2x")], b"{}", 411, "Content-Length required"),
        # str.isdigit() accepts superscripts, which int() refuses: a 411, never a 500
        ("POST", "/v1/generate", k + [("Content-Length", "\u00b2")], b"{}", 411, "Content-Length required"),
        ("POST", "/v1/generate", k + [("Content-Length", "101")], b"{}", 413, "request body over 100 bytes"),
        ("POST", "/healthz", [("Content-Length", "999")], b"{}", 413, "request body over 100 bytes"),
        ("GET", "/v1/models", [], b"", 401, "missing or wrong API key (X-API-Key header)"),
        ("GET", "/v1/models", [("X-API-Key", "wrong")], b"", 401, "missing or wrong API key (X-API-Key header)"),
        ("GET", "/v1/models", [("Authorization", "Basic " + KEY)], b"", 401,
         "missing or wrong API key (X-API-Key header)"),
        ("GET", "/nowhere", [], b"", 401, "missing or wrong API key (X-API-Key header)"),
        ("GET", "/static/nothing.js", [], b"", 401, "missing or wrong API key (X-API-Key header)"),
    ]
    for method, path, headers, body, want, detail in cases:
        status, got_headers, raw = call(app, method, path, headers + [("X-Request-ID", "req-guard")], body)
        assert status == want and json.loads(raw) == {"detail": detail, "request_id": "req-guard"}, (path, raw)
        assert rid_of(got_headers) == "req-guard"
    for headers in ([("X-API-Key", KEY)], [("Authorization", "Bearer " + KEY)], [("authorization", "bEaReR " + KEY)],
                    [("X-API-Key", ""), ("Authorization", "Bearer " + KEY)]):
        assert call(app, "GET", "/v1/models", headers)[0] == 200, headers
    for path in ("/", "/healthz", "/openapi.json", "/static/page.js"):
        assert call(app, "GET", path)[0] == 200, path
    text = metrics_text(app)
    assert 'onestep_errors_total{reason="no_length"} 3.0' in text
    assert 'onestep_errors_total{reason="too_large"} 2.0' in text
    assert 'onestep_errors_total{reason="auth"} 5.0' in text
    # refused before routing: no route, so "other"
    assert 'onestep_requests_total{code="411",handler="other",method="POST"} 3.0' in text
    assert 'onestep_requests_total{code="401",handler="other",method="GET"} 5.0' in text


def test_access_log_line():
    app = _app()
    with records("onestep.access") as logged:
        status, headers, _ = call(app, "GET", "/healthz", [("X-Request-ID", "req-log")])
        call(app, "GET", "/no?where")
    assert status == 200
    first, second = (json.loads(m) for m, _ in logged)
    assert set(first) == {"ts", "request_id", "method", "path", "status", "duration_ms", "client"}
    assert {k: first[k] for k in ("request_id", "method", "path", "status", "client")} == \
        {"request_id": "req-log", "method": "GET", "path": "/healthz", "status": 200, "client": "10.1.2.3"}
    assert isinstance(first["ts"], float) and 0 <= first["duration_ms"] < 10_000
    assert second["path"] == "/no%3Fwhere" and second["status"] == 404


@pytest.mark.parametrize("path", ["/healthz", "/", "/a?b#c\\d", "/heal\thz", "/x\r\ny", "\t/x", "x", "*", "",
                                  "//double", "/static/page.js", "/ünï"])
def test_url_path_is_the_one_starlette_reports(path):
    from starlette.requests import Request

    from serving.api import _url_path

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": [(b"host", b"api.test")],
             "scheme": "http", "server": ("127.0.0.1", 8000)}
    assert _url_path(path) == Request(scope).url.path


@pytest.mark.parametrize("field, value", [("seed", False), ("seed", True), ("n", True), ("seed", "3"),
                                          ("label", False), ("seeds", [0, True]), ("labels", ["1"]), ("n", 2.5)])
def test_integer_fields_refuse_booleans_and_strings(field, value):
    """JSON true/false and "3" are not integers: a lax int would read `"seed": false` as seed 0."""
    app = _app()
    extra = {"labels": [0, 1]} if field == "seeds" else ({"seeds": [0]} if field == "labels" else {})
    status, _, raw = call(app, "POST", "/v1/generate", [], json_body={"model": "tiny", field: value, **extra})
    assert status == 422, raw
    assert field in json.dumps(json.loads(raw)["detail"])


def test_integral_floats_are_integers():
    """JSON Schema counts 9546.0 as an integer: accepted as 9546, like 9546."""
    from serving.api import request_model

    model = request_model(8, {})
    assert model(model="tiny", seeds=[1, 9546.0]).seed_list() == [1, 9546]

"""Serving under attack: each test pins one protection of the API, the Triton launcher or the deployment."""

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.triton_server import ADMIN_HEADER, TritonServer

ROOT = Path(__file__).resolve().parent.parent


def _post(url, body=b"", headers=None, timeout=10):
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def locked_triton(tiny_artifacts):
    os.environ["ONESTEP_API_KEY"] = "never-in-triton"
    try:
        with TritonServer(tiny_artifacts["repo"], models=["tiny"], ready_timeout=90) as ts:
            yield ts
    finally:
        os.environ.pop("ONESTEP_API_KEY", None)


@pytest.mark.triton
def test_triton_cannot_load_or_unload_models(locked_triton):
    base = f"http://{locked_triton.http_url}/v2"
    for path in ("/repository/models/tiny/unload", "/repository/models/teacher_heun3/load", "/repository/index"):
        status, _ = _post(base + path)
        assert status in (400, 401, 403), (path, status)
    for path in ("/systemsharedmemory/region/x/register", "/trace/setting", "/logging"):
        status, _ = _post(base + path, b"{}")
        assert status in (400, 401, 403, 404), (path, status)
    # even with the admin key, the model set is fixed at start (model control mode none)
    key = {ADMIN_HEADER: locked_triton.admin_key}
    status, body = _post(base + "/repository/models/teacher_heun3/load", headers=key)
    assert status >= 400, body
    status, body = _post(base + "/repository/models/tiny/unload", headers=key)
    assert status >= 400, body
    assert locked_triton.is_ready()
    import tritonclient.grpc as g

    c = g.InferenceServerClient(locked_triton.grpc_url)
    with pytest.raises(Exception):
        c.load_model("teacher_heun3")
    with pytest.raises(Exception):
        c.unload_model("tiny")
    assert c.is_model_ready("tiny") and not c.is_model_ready("teacher_heun3")


@pytest.mark.triton
def test_api_key_never_reaches_triton(locked_triton):
    env = open(f"/proc/{locked_triton.proc.pid}/environ", "rb").read()
    assert b"never-in-triton" not in env and b"ONESTEP_API_KEY" not in env


def _api_settings(ts, tiny_artifacts, **kw):
    from serving.api import APISettings

    return APISettings(triton_url=ts.grpc_url, repository=str(tiny_artifacts["repo"]), **kw)


def _get(url, headers=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _gen(url, body, headers=None):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/generate", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def locked_api(locked_triton, tiny_artifacts):
    from serving.background import APIThread

    s = _api_settings(locked_triton, tiny_artifacts, served=["tiny"], max_images=16,
                      triton_metrics_url=f"127.0.0.1:{locked_triton.metrics_port}")
    with APIThread(s) as api:
        yield api


@pytest.mark.triton
@pytest.mark.parametrize("body", [
    {"model": "tiny", "n": 4611686018427387904},
    {"model": "tiny", "n": 10000000},
    {"model": "tiny", "seed": 2**63 - 1, "n": 2},
    {"model": "tiny", "seed": 2**70},
    {"model": "tiny", "seeds": [2**63]},
    {"model": "tiny", "seeds": list(range(17))},
    {"model": "tiny", "labels": [1] * 17, "seeds": list(range(17))},
    {"model": "tiny", "seeds": [1], "label": 2**80},
])
def test_bounds_are_checked_before_allocation(locked_api, body):
    import time

    t0 = time.perf_counter()
    status, headers, raw = _gen(locked_api.url, body)
    assert 400 <= status < 500, (status, raw[:300])
    assert time.perf_counter() - t0 < 2.0
    out = json.loads(raw)
    assert out["detail"] and out["request_id"] == headers["X-Request-ID"]


@pytest.mark.triton
def test_request_id_in_and_out_and_in_every_error(locked_api):
    status, headers, raw = _gen(locked_api.url, {"model": "tiny", "seed": 1}, {"X-Request-ID": "abc-123"})
    assert status == 200 and headers["X-Request-ID"] == "abc-123" and json.loads(raw)["request_id"] == "abc-123"
    status, headers, raw = _gen(locked_api.url, {"model": "tiny", "seed": 1}, {"X-Request-ID": "bad id\t<>" * 20})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    for status, headers, raw in (_get(locked_api.url + "/nowhere"), _gen(locked_api.url, {"model": "nope"}),
                                 _gen(locked_api.url, {"model": "tiny", "bogus": 1})):
        body = json.loads(raw)
        assert set(body) == {"detail", "request_id"} and body["request_id"] == headers["X-Request-ID"], body


@pytest.mark.triton
def test_triton_errors_are_typed_and_never_leak(locked_triton, tiny_artifacts):
    """teacher_heun3 is in the manifest but this Triton did not load it: a typed 503, no Triton text."""
    from serving.background import APIThread

    s = _api_settings(locked_triton, tiny_artifacts, served=["tiny", "teacher_heun3"])
    with APIThread(s) as api:
        status, headers, raw = _gen(api.url, {"model": "teacher_heun3", "seed": 1})
        assert status == 503 and headers.get("Retry-After")
        text = raw.decode()
        for leak in ("Triton:", "StatusCode", "127.0.0.1", "unknown model", "teacher_heun3' is", "grpc"):
            assert leak not in text, text
        assert set(json.loads(raw)) == {"detail", "request_id"}


@pytest.mark.triton
def test_metrics_follow_prometheus_conventions(locked_api):
    _gen(locked_api.url, {"model": "tiny", "seed": 1})
    _gen(locked_api.url, {"model": "tiny", "n": 99})
    _, _, raw = _get(locked_api.url + "/metrics")
    text = raw.decode()
    assert "onestep_request_duration_seconds_bucket" in text
    assert 'onestep_requests_total{code="422",handler="/v1/generate",method="POST"}' in text
    assert 'onestep_requests_total{code="200",handler="/v1/generate",method="POST"}' in text
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    assert "onestep_triton_up 1.0" in text
    assert "onestep_request_seconds" not in text
    status, _, raw = _get(locked_api.url + "/metrics/triton")
    assert status == 200 and b"nv_inference_request_success" in raw


@pytest.mark.triton
def test_liveness_fails_when_triton_stays_dead(tiny_artifacts):
    import time

    from serving.background import APIThread

    ts = TritonServer(tiny_artifacts["repo"], models=["tiny"], ready_timeout=90).start()
    try:
        s = _api_settings(ts, tiny_artifacts, served=["tiny"], watch_interval_s=0.2, triton_dead_after_s=1.5)
        with APIThread(s) as api:
            assert _get(api.url + "/healthz")[0] == 200 and _get(api.url + "/readyz")[0] == 200
            ts.kill()
            deadline = time.time() + 15
            while _get(api.url + "/healthz")[0] == 200:
                assert time.time() < deadline, "liveness stayed 200 with Triton dead"
                time.sleep(0.2)
            assert _get(api.url + "/readyz")[0] == 503
    finally:
        ts.stop()


@pytest.mark.triton
def test_readiness_does_not_wait_for_the_generate_pool(locked_triton, tiny_artifacts):
    """Every generate thread busy (max_inflight 2, slow batches): /readyz still answers at once."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serving.background import APIThread

    s = _api_settings(locked_triton, tiny_artifacts, served=["tiny"], max_inflight=2, max_images=16)
    with APIThread(s) as api:
        def load(i):
            for _ in range(6):
                _gen(api.url, {"model": "tiny", "seed": i * 100, "n": 16})

        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(load, i) for i in range(4)]
            worst = 0.0
            for _ in range(10):
                t0 = time.perf_counter()
                assert _get(api.url + "/readyz")[0] == 200
                worst = max(worst, time.perf_counter() - t0)
            for f in futs:
                f.result()
        assert worst < 0.5, worst


def test_nginx_does_not_retry_429_and_bounds_retries():
    import yaml

    conf = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["configs"]["nginx_conf"]["content"]
    nu = re.search(r"proxy_next_upstream\s+([^;]*);", conf).group(1).split()
    assert "http_429" not in nu and "error" in nu
    tries = re.search(r"proxy_next_upstream_tries\s+(\d+);", conf)
    assert tries and 1 <= int(tries.group(1)) <= 3
    assert re.search(r"proxy_next_upstream_timeout\s+\d+s;", conf)


def test_compose_requires_an_api_key():
    text = (ROOT / "deploy" / "docker-compose.yml").read_text()
    assert "${ONESTEP_API_KEY:?" in text

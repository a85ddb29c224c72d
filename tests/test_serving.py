"""End to end against the REAL Triton server bundled in nvidia-pytriton (python backend), loopback only."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.triton

from serving.client import APIClient, APIError, TritonImageClient  # noqa: E402
from serving.engine import ImageEngine  # noqa: E402
from serving.background import APIThread as APIServer
from serving.triton_server import TritonServer  # noqa: E402


@pytest.fixture(scope="module")
def triton(tiny_artifacts):
    with TritonServer(tiny_artifacts["repo"], ready_timeout=90) as ts:
        yield ts


def _settings(triton, tiny_artifacts, **kw):
    from serving.api import APISettings

    return APISettings(triton_url=triton.grpc_url, repository=str(tiny_artifacts["repo"]), **kw)


@pytest.fixture(scope="module")
def api(triton, tiny_artifacts):
    with APIServer(_settings(triton, tiny_artifacts, max_images=16)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_artifacts):
    """In-process onnxruntime images: what every served path must reproduce."""
    eng = ImageEngine(tiny_artifacts["student_onnx"])
    seeds = list(range(20))
    return {s: img for s, img in zip(seeds, eng.generate(seeds, [s % 10 for s in seeds]))}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_images_match_in_process(triton, reference, protocol):
    c = TritonImageClient(triton.http_url if protocol == "http" else triton.grpc_url, protocol)
    imgs = c.generate("tiny", [3, 4, 5], [3, 4, 5])
    assert imgs.shape == (3, 1, 32, 32) and imgs.dtype == np.uint8
    for s, img in zip([3, 4, 5], imgs):
        np.testing.assert_array_equal(img, reference[s])
    teacher = c.generate("teacher_heun3", [1], [1])
    assert teacher.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batch_invariance_under_concurrency(triton, reference, protocol):
    """Concurrent requests get merged by the dynamic batcher (20 ms window); each image must still equal
    the one served alone for that (seed, label)."""
    url = triton.http_url if protocol == "http" else triton.grpc_url
    groups = [[s] for s in range(8)] + [[1, 9, 17], [2, 3], [11, 12, 13, 14]]

    def call(seeds):
        c = TritonImageClient(url, protocol)
        try:
            return seeds, c.generate("tiny", seeds, [s % 10 for s in seeds])
        finally:
            c.close()

    with ThreadPoolExecutor(len(groups)) as ex:
        results = list(ex.map(call, groups))
    for seeds, imgs in results:
        for s, img in zip(seeds, imgs):
            np.testing.assert_array_equal(img, reference[s])


def test_api_generate_formats(api, reference):
    from PIL import Image

    c = APIClient(api.url)
    raw = c.generate("tiny", [5, 6], [5, 6])
    np.testing.assert_array_equal(raw[0], reference[5])
    png = c.generate_png("tiny", 7, 7)
    img = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(img, reference[7][0])
    for fmt in ("jpeg", "webp", "png"):
        status, headers, body = c._req("POST", "/v1/generate", {"model": "tiny", "seed": 2, "n": 3, "format": fmt})
        out = json.loads(body)
        assert [im["seed"] for im in out["images"]] == [2, 3, 4]
        assert [im["label"] for im in out["images"]] == [2, 3, 4]  # default label = seed mod classes
        pic = Image.open(io.BytesIO(base64.b64decode(out["images"][0]["data"])))
        assert pic.size == (32, 32) and pic.format.lower() == fmt


def test_api_same_image_alone_or_batched_over_http(api):
    c = APIClient(api.url)
    alone = c.generate("tiny", [9], [4])
    with ThreadPoolExecutor(6) as ex:
        batched = list(ex.map(lambda s: c.generate("tiny", [s, 9, s + 1], [1, 4, 2]), range(6)))
    for b in batched:
        np.testing.assert_array_equal(b[1], alone[0])


def test_api_models_health_metrics_openapi(api):
    c = APIClient(api.url)
    names = {m["name"]: m for m in c.models()}
    assert names["tiny"]["nfe"] == 1 and names["teacher_heun3"]["nfe"] == 5 and "tiny_onnx" not in names
    assert json.loads(c._req("GET", "/healthz")[2]) == {"status": "ok"}
    ready = json.loads(c._req("GET", "/readyz")[2])
    assert ready["triton"] and all(ready["models"].values())
    c.generate("tiny", [1], [1])
    metrics = c._req("GET", "/metrics")[2].decode()
    assert 'onestep_images_total{model="tiny"}' in metrics and "onestep_request_duration_seconds_bucket" in metrics
    assert 'onestep_requests_total{code="200",handler="/v1/generate",method="POST"}' in metrics
    schema = json.loads(c._req("GET", "/openapi.json")[2])
    assert "/v1/generate" in schema["paths"]


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "seeds": [1]}, 404, "unknown model"),
    ({"model": "../../etc/passwd", "seeds": [1]}, 422, "pattern"),
    ({"model": "tiny", "seeds": [1], "label": 10}, 400, "out of range"),
    ({"model": "tiny", "seeds": [-1]}, 422, "greater than or equal to 0"),
    ({"model": "tiny", "n": 17}, 400, "at most 16 images per request, asked for 17"),
    ({"model": "tiny", "seeds": list(range(17))}, 400, "at most 16 images per request, asked for 17"),
    ({"model": "tiny", "n": 4611686018427387904}, 400, "at most 16 images"),
    ({"model": "tiny", "seeds": [1, 2], "labels": [1]}, 422, "labels has 1 entries"),
    ({"model": "tiny", "seeds": [1], "seed": 3}, 422, "either seeds"),
    ({"model": "tiny", "n": 2, "response": "image"}, 422, "exactly one image"),
    ({"model": "tiny", "seeds": [1], "format": "gif"}, 422, "format"),
    ({"seeds": [1]}, 422, "model"),
])
def test_api_bad_inputs_are_4xx_with_a_message(api, body, status, needle):
    with pytest.raises(APIError) as e:
        APIClient(api.url)._req("POST", "/v1/generate", body)
    assert e.value.status == status
    assert needle in json.dumps(e.value.detail)


def test_api_body_limit(api):
    with pytest.raises(APIError) as e:
        APIClient(api.url)._req("POST", "/v1/generate", {"model": "tiny", "seeds": list(range(20000))})
    assert e.value.status == 413


def test_api_key_required_when_set(triton, tiny_artifacts):
    with APIServer(_settings(triton, tiny_artifacts, api_key="s3cret")) as srv:
        with pytest.raises(APIError) as e:
            APIClient(srv.url).models()
        assert e.value.status == 401
        assert APIClient(srv.url, api_key="s3cret").models()
        assert json.loads(APIClient(srv.url)._req("GET", "/healthz")[2])["status"] == "ok"


def test_bounded_inflight_answers_429_with_retry_after(triton, tiny_artifacts):
    with APIServer(_settings(triton, tiny_artifacts, max_inflight=1)) as srv:
        c = APIClient(srv.url)

        def call(i):
            try:
                c.generate("teacher_heun3", list(range(i * 16, i * 16 + 16)), [1] * 16)
                return 200
            except APIError as e:
                return e.status

        with ThreadPoolExecutor(8) as ex:
            statuses = list(ex.map(call, range(8)))
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}


def test_triton_killed_gives_503_then_recovers(tiny_artifacts, tmp_path):
    ts = TritonServer(tiny_artifacts["repo"], models=["tiny"], ready_timeout=90).start()
    try:
        from serving.api import APISettings

        settings = APISettings(triton_url=ts.grpc_url, repository=str(tiny_artifacts["repo"]),
                               request_timeout_s=10)
        with APIServer(settings) as srv:
            c = APIClient(srv.url)
            first = c.generate("tiny", [1], [1])
            ts.kill()
            with pytest.raises(APIError) as e:
                c.generate("tiny", [1], [1])
            assert e.value.status == 503
            deadline = time.time() + 10  # the watcher notices within its interval
            while True:
                try:
                    c._req("GET", "/readyz")
                except APIError as e:
                    assert e.status == 503
                    break
                assert time.time() < deadline, "readiness never turned 503"
                time.sleep(0.2)
            ts.stop()
            ts.start()  # same ports: the API reconnects without a restart
            deadline = time.time() + 30
            while True:
                try:
                    again = c.generate("tiny", [1], [1])
                    break
                except APIError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
            np.testing.assert_array_equal(first, again)
    finally:
        ts.stop()


def test_api_server_timing_stages_add_up_to_at_most_the_total(api):
    from benchmarks.latency import parse_server_timing

    c = APIClient(api.url)
    for body in ({"model": "tiny", "seeds": [3, 4], "format": "raw"},
                 {"model": "tiny", "seeds": [3], "format": "png", "response": "image"}):
        status, headers, payload = c._req("POST", "/v1/generate", body)
        assert status == 200
        st = parse_server_timing(headers.get("Server-Timing") or headers.get("server-timing"))
        assert set(st) == {"parse", "queue", "triton", "encode", "total"}
        assert all(v >= 0 for v in st.values()) and st["triton"] > 0
        assert sum(v for k, v in st.items() if k != "total") <= st["total"] + 1e-6
        if body.get("response") != "image":
            assert json.loads(payload)["timings_ms"]["total"] == pytest.approx(st["total"] * 1e3, abs=1e-3)

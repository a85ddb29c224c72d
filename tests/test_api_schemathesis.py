"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis strategies driven by
hypothesis), against the real app in front of the real local Triton, with every built-in check: no 5xx,
responses conform to the schema (status codes, content types, bodies), data the schema allows is accepted
(positive data acceptance) and data it forbids is rejected; every error carries a message and a request id."""

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402

from serving.api import APISettings  # noqa: E402
from serving.background import APIThread  # noqa: E402
from serving.triton_server import TritonServer  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def api_url(tiny_artifacts):
    with TritonServer(tiny_artifacts["repo"], models=["tiny"], ready_timeout=90) as ts:
        settings_ = APISettings(triton_url=ts.grpc_url, repository=str(tiny_artifacts["repo"]), served=["tiny"],
                                max_images=8)
        with APIThread(settings_) as api:
            yield api.url


def all_checks():
    load_all_checks()
    return CHECKS.get_all()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_all_checks_find_nothing(api_url, mode):
    schema = schemathesis.openapi.from_url(api_url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= {("POST", "/v1/generate"), ("GET", "/v1/models")}
    seen = {}
    checks = all_checks()
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # GET operations take no input to break
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=60 if op.path == "/v1/generate" else 5, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call_and_validate(base_url=api_url, timeout=30, checks=checks)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code >= 400:
                body = response.json()
                assert body.get("detail") and body.get("request_id"), (case.body, response.text[:300])

        check()
    if mode is GenerationMode.POSITIVE:
        assert 200 in seen and all(s < 300 for s in seen), seen
    else:
        assert any(400 <= s < 500 for s in seen), seen

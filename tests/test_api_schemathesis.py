"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis strategies driven by
hypothesis), against the real app in front of the real local Triton: no request may produce a 5xx, and every
error carries a message."""

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402

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


def test_no_5xx_and_every_error_explained(api_url):
    schema = schemathesis.openapi.from_url(api_url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= {("POST", "/v1/generate"), ("GET", "/v1/models")}
    seen = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=60 if op.path == "/v1/generate" else 5, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=api_url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (op.path, case.body, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert response.json().get("detail"), (case.body, response.text[:300])

        check()
    assert any(400 <= s < 500 for s in seen) and 200 in seen, seen

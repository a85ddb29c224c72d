"""Short reliability run in the suite (seconds); the long one: python -m benchmarks.reliability (see README)."""

import pytest

pytestmark = pytest.mark.triton


def test_load_faults_and_bad_inputs(tiny_artifacts, tmp_path):
    from benchmarks.reliability import run

    res = run(tiny_artifacts["repo"], "tiny", seconds=3.0, limit=4, out=tmp_path / "rel")
    v = res["verdict"]
    assert v["below_limit_zero_errors"], res["below_limit"]
    assert v["above_limit_only_429"], res["above_limit"]
    assert v["killed_gives_503_not_5xx_others"], res["triton_killed"]
    assert v["recovered_without_api_restart"], res["after_recovery"]
    assert v["bad_inputs_all_4xx_with_message"], [b for b in res["bad_inputs"] if not b["ok"]]
    assert v["rss_growth_mb_under_load"] < 200
    assert (tmp_path / "rel.md").read_text().startswith("# Reliability run")

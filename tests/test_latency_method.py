"""The measuring method behind every latency figure: bootstrap intervals, interleaved rounds, stage sums,
report heads; and the raw-tensor model on the real local Triton with its statistics. No timed assertions."""

import numpy as np
import pytest

from benchmarks import stats
from benchmarks.stats import Method


def test_constant_ratios_give_a_zero_width_interval():
    e = stats.ratio([10.0] * 12, [5.0] * 12)
    assert e["median"] == e["ci_low"] == e["ci_high"] == 2.0
    assert e["spread"] == 0.0 and not e["large_spread"] and e["rounds"] == 12


def test_bootstrap_interval_contains_the_true_median_and_is_seeded():
    rng = np.random.default_rng(123)
    sample = rng.lognormal(mean=np.log(3.0), sigma=0.2, size=200)  # true median 3.0
    lo, hi = stats.bootstrap_ci(sample)
    assert lo < 3.0 < hi and hi - lo < 0.3
    assert stats.bootstrap_ci(sample) == (lo, hi)  # same seed, same interval
    assert stats.bootstrap_ci(sample, seed=1) != (lo, hi)
    # coverage over many known samples: close to 95% (generous bounds: a statistical test, not a timing one)
    hits = 0
    for i in range(200):
        s = np.random.default_rng(1000 + i).normal(5.0, 1.0, size=30)
        lo, hi = stats.bootstrap_ci(s, samples=500)
        hits += lo <= 5.0 <= hi
    assert 0.85 <= hits / 200 <= 0.995


def test_ratio_is_the_median_of_per_round_ratios():
    a = [2.0, 4.0, 30.0]  # a slow spell in round 3 hits both paths alike
    b = [1.0, 2.0, 10.0]
    e = stats.ratio(a, b)
    assert e["median"] == 2.0  # ratio of medians would be 4/2 = 2 too, but per-round: [2, 2, 3]
    assert stats.ratio([1, 2, 3, 4], [1, 1, 1, 1])["median"] == 2.5
    with pytest.raises(ValueError, match="same rounds"):
        stats.ratio([1.0, 2.0], [1.0])


def test_single_round_and_empty_inputs():
    assert stats.bootstrap_ci([7.0]) == (7.0, 7.0)
    lo, hi = stats.bootstrap_ci([])
    assert np.isnan(lo) and np.isnan(hi)


def test_large_spread_is_noted():
    calm = stats.estimate([10.0, 10.1, 9.9, 10.0])
    noisy = stats.estimate([10.0, 14.0, 7.0, 12.0])
    assert not calm["large_spread"] and noisy["large_spread"]
    notes = stats.spread_notes({"calm": calm, "noisy": noisy})
    assert len(notes) == 1 and notes[0].startswith("noisy:")


def test_interleaving_order():
    assert stats.interleaved_order(["A", "B", "C"], 2) == [(0, "A"), (0, "B"), (0, "C"), (1, "A"), (1, "B"), (1, "C")]


def test_run_interleaved_runs_paths_in_rounds_with_enough_calls():
    log = []
    paths = {name: (lambda n=name: log.append(n) or {"x": 0.0}) for name in ("A", "B", "C")}
    m = Method(min_calls=12, window_s=0.0, rounds=4, warmup_calls=2)
    res = stats.run_interleaved(paths, m)
    assert log[:6] == ["A", "A", "B", "B", "C", "C"]  # warm-up first, outside the rounds
    timed = log[6:]
    per_round = m.per_round()[0]
    assert per_round == 3
    expected = [n for _ in range(4) for n in ("A", "B", "C") for _ in range(per_round)]
    assert timed == expected  # A A A B B B C C C, then the next round
    for name in paths:
        assert len(res[name].calls) == 4 and sum(len(c) for c in res[name].calls) == 12
        assert res[name].stage_round_means() == {"x": [0.0] * 4}


def test_run_interleaved_hooks_wrap_each_block():
    events = []
    paths = {"A": lambda: events.append("call"), "B": lambda: None}
    hooks = {"A": (lambda: events.append("before") or 5, lambda tok, n: {"token": tok, "calls": n})}
    res = stats.run_interleaved(paths, Method(min_calls=4, window_s=0.0, rounds=2, warmup_calls=0), hooks)
    assert events == ["before", "call", "call", "before", "call", "call"]
    assert res["A"].extra == [{"token": 5, "calls": 2}] * 2 and res["B"].extra == [{}, {}]


def test_method_window_and_quick():
    m = Method(min_calls=200, window_s=10.0, rounds=10)
    assert m.per_round() == (20, 1.0)
    assert "200 timed calls" in m.describe() and "indicative" not in m.describe()
    q = Method.quick_method()
    assert q.quick and q.rounds >= 3 and "indicative" in q.describe()
    assert q.as_dict()["bootstrap"]["seed"] == stats.BOOTSTRAP_SEED


def test_stage_sum_check():
    total = [0.010, 0.011, 0.0105, 0.0102]
    good = {"noise": [0.001] * 4, "model": [t - 0.002 for t in total], "encode": [0.001] * 4}
    t = stats.stage_table(total, good)
    assert t["adds_up"] and abs(t["unaccounted_ms"]["median"]) < 1e-9
    assert list(t["stages_ms"]) == t["order"] == ["noise", "model", "encode"]
    assert t["stages_ms"]["noise"]["median"] == pytest.approx(1.0)
    missing = {"noise": [0.001] * 4, "model": [t_ - 0.004 for t_ in total]}  # 3 ms of every call unaccounted
    bad = stats.stage_table(total, missing)
    assert not bad["adds_up"] and bad["unaccounted_ms"]["median"] == pytest.approx(3.0)
    assert stats.failed_sums({"ok": t, "bad": bad}) == ["bad"]
    with pytest.raises(ValueError, match="rounds"):
        stats.stage_table(total, {"noise": [0.001] * 3})


def test_served_stages_from_client_marks_and_triton_statistics():
    from benchmarks.latency import served_stage_rounds

    pr = stats.PathResult("triton-grpc|student")
    ms = 1e-3
    pr.calls = [[10 * ms, 10 * ms]]
    pr.stages = [[{"serialise": 0.1 * ms, "infer_call": 9.8 * ms, "deserialise": 0.1 * ms}] * 2]
    per = {"success": 9.0 * ms, "queue": 0.2 * ms, "compute_input": 0.3 * ms, "compute_infer": 8.0 * ms,
           "compute_output": 0.4 * ms}
    pr.extra = [{"requests": 2, "calls": 2, "per_request_s": per, "executions": 2, "inferences": 2}]
    stages, problems = served_stage_rounds(pr)
    assert not problems
    assert list(stages) == ["client serialise", "transport", "Triton queue", "Triton compute input",
                            "Triton compute infer", "Triton compute output", "Triton request outside queue + compute",
                            "client deserialise"]
    assert stages["transport"][0] == pytest.approx(0.8 * ms)
    assert sum(v[0] for v in stages.values()) == pytest.approx(10 * ms)
    assert stats.stage_table(pr.round_means(), stages)["adds_up"]
    pr.extra[0]["requests"] = 3  # Triton saw a request that was not ours: the breakdown is not of these calls
    assert served_stage_rounds(pr)[1] == ["round 0: Triton counted 3 requests for 2 calls"]


def test_server_timing_header_parsing():
    from benchmarks.latency import parse_server_timing

    assert parse_server_timing('parse;dur=0.5, triton;desc="grpc";dur=7.25,encode;dur=1') == \
        pytest.approx({"parse": 0.5e-3, "triton": 7.25e-3, "encode": 1e-3})
    assert parse_server_timing(None) == {}


def test_report_head_says_first_when_stages_do_not_add_up():
    from benchmarks.report import header_lines

    res = {"machine": {"cpu_model": "Test CPU", "cpu_count": 2}, "method": {"quick": True},
           "method_text": Method.quick_method().describe()}
    lines = header_lines("T", res, ["onnxruntime/student/batch1"], ["x: rounds spread 30% (IQR / median)"])
    assert lines[0].startswith("**Stages do not add up") and "onnxruntime/student/batch1" in lines[0]
    text = "\n".join(lines)
    assert "indicative" in text and "Test CPU, 2 cores" in text and "rounds spread 30%" in text
    assert header_lines("T", {"machine": {}}, [], [])[0].startswith("Every stage table")


def test_queue_delay_recommendation_respects_the_latency_budget():
    from benchmarks.queue_delay import recommend

    def row(d, c, thr, lat_hi, pref=False):
        return {"delay_us": d, "clients": c, "preferred": pref, "preferred_sizes": [4, 16] if pref else [],
                "images_per_s": {"median": thr}, "p50_vs_zero_delay": {"ci_high": lat_hi}}

    rows = [row(0, 1, 100, 1.0), row(0, 16, 150, 1.0), row(100, 1, 99, 1.03), row(100, 16, 170, 1.0),
            row(1000, 1, 90, 1.2), row(1000, 16, 200, 1.0)]
    rec = recommend(rows, 0.05)
    assert rec["max_queue_delay_us"] == 100 and rec["clients"] == 16  # 1000 us is faster but costs 20% at 1 client
    assert recommend(rows, 0.5)["max_queue_delay_us"] == 1000


@pytest.mark.triton
def test_raw_tensor_model_answers_on_the_real_triton_with_statistics(tiny_artifacts):
    """The python-backend raw-tensor model loads in the bundled server, answers z, labels -> image floats equal
    to in-process onnxruntime, and Triton's statistics count exactly the timed calls."""
    from benchmarks.latency import served_stage_rounds, statistics_hook, tensor_call, triton_call
    from onestep.noise import seeded_noise
    from serving.client import TritonImageClient
    from serving.engine import ImageEngine
    from serving.triton_server import TritonServer

    eng = ImageEngine(tiny_artifacts["student_onnx"])
    with TritonServer(tiny_artifacts["repo"], models=["tiny", "tiny_tensor"], ready_timeout=120) as ts:
        c = TritonImageClient(ts.grpc_url, "grpc")
        tc = c.tc
        z = seeded_noise([3, 4], (1, 32, 32))
        inputs = [tc.InferInput("z", list(z.shape), "FP32"), tc.InferInput("labels", [2, 1], "INT64")]
        inputs[0].set_data_from_numpy(z)
        inputs[1].set_data_from_numpy(np.array([[3], [4]], np.int64))
        out = c.client.infer("tiny_tensor", inputs).as_numpy("image")
        assert out.dtype == np.float32 and out.shape == (2, 1, 32, 32)
        np.testing.assert_allclose(out, eng.model_output(z, np.array([3, 4])), atol=1e-5)
        bad = [tc.InferInput("z", [1, 1, 32, 32], "FP32"), tc.InferInput("labels", [1, 1], "INT64")]
        bad[0].set_data_from_numpy(z[:1])
        bad[1].set_data_from_numpy(np.array([[10]], np.int64))
        with pytest.raises(Exception, match="labels must lie"):
            c.client.infer("tiny_tensor", bad)

        m = Method(min_calls=6, window_s=0.0, rounds=3, warmup_calls=1)
        paths = {"tensor": lambda: tensor_call(c, "tiny_tensor", [1], (1, 32, 32), np.array([[1]]),
                                               ("z", "labels", "image")),
                 "seed": lambda: triton_call(c, "tiny", np.array([[1]]), np.array([[1]]))}
        hooks = {"tensor": statistics_hook(c.client, "tiny_tensor"), "seed": statistics_hook(c.client, "tiny")}
        res = stats.run_interleaved(paths, m, hooks)
        for name, pr in res.items():
            assert [e["requests"] for e in pr.extra] == [2, 2, 2]
            stages, problems = served_stage_rounds(pr)
            assert not problems and all(len(v) == 3 for v in stages.values())
            assert all(v > 0 for v in stages["Triton compute infer"])
            table = stats.stage_table(pr.round_means(), stages)
            assert set(table["stages_ms"]) == set(stages)
        assert "client noise" in served_stage_rounds(res["tensor"])[0]
        c.close()


@pytest.mark.triton
def test_bench_quick_end_to_end_structure(tiny_artifacts, tmp_path):
    """`onestep bench --quick` on the tiny student/teacher through every local backend: every ratio has an
    interval from interleaved rounds, every stage table holds the stages of its path and its sum check, and
    Triton's statistics covered exactly the timed calls."""
    import argparse
    import shutil

    from benchmarks import latency

    work = tmp_path / "work"
    work.mkdir()
    for kind in ("student", "teacher"):  # already exported: the benchmark reuses them
        for suffix in (".onnx", ".onnx.json"):
            shutil.copy(tiny_artifacts[f"{kind}_onnx"].with_name(f"{kind}{suffix}"), work / f"{kind}{suffix}")
    ap = argparse.ArgumentParser()
    latency.add_arguments(ap)
    out = tmp_path / "bench"
    args = ap.parse_args(["--student", str(tiny_artifacts["student_ckpt"]), "--teacher",
                          str(tiny_artifacts["teacher_ckpt"]), "--quick", "--backends",
                          "onnxruntime,triton-grpc,triton-tensor,api", "--concurrency", "1,2", "--threads", "1",
                          "--window-s", "0", "--min-calls", "6", "--rounds", "3", "--workdir", str(work),
                          "--out", str(out)])
    assert latency.main_args(args) == 0
    import json

    res = json.loads(out.with_suffix(".json").read_text())
    assert res["method"]["quick"] and res["method"]["rounds"] == 3 and not res["problems"]
    keys = {(r["backend"], r["model"]) for r in res["rows"]}
    assert {("onnxruntime", "student"), ("triton-grpc", "teacher_heun3"), ("triton-tensor", "student"),
            ("api", "teacher_euler2")} <= keys
    for r in res["rows"]:
        assert r["runs"] >= 6 and len(r["round_medians_ms"]) == 3
        assert r["p50_ci_ms"][0] <= r["p50_ms"] <= r["p50_ci_ms"][1]
    kinds = {(x["kind"], x["backend"]) for x in res["ratios"]}
    assert {("speedup", "onnxruntime"), ("speedup", "api"), ("served_overhead", "triton-tensor")} <= kinds
    for x in res["ratios"]:
        assert x["rounds"] == 3 and x["ci_low"] <= x["median"] <= x["ci_high"]
    tables = res["stage_tables"]
    assert tables["onnxruntime/student/batch1"]["order"] == ["noise", "model", "encode (uint8)"]
    assert "client noise" in tables["triton-tensor/student/batch1"]["stages_ms"]
    api = tables["api/student/batch1"]["stages_ms"]
    assert {"API encode", "Triton queue", "Triton compute infer", "client deserialise"} <= set(api)
    assert all("adds_up" in t and "unaccounted_ms" in t for t in tables.values())
    assert [c["concurrency"] for c in res["concurrency"]] == [1, 2]
    md = out.with_suffix(".md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("Every stage table") == (not res["summary"]["stages_do_not_add_up"])
    assert "indicative" in md and "Machine:" in md


@pytest.mark.triton
def test_queue_delay_benchmark_structure(tiny_artifacts, tmp_path):
    """benchmarks.queue_delay --quick: one model copy per (delay, preferred sizes) in one server, every
    (configuration, clients) path measured in the same rounds, ratios against zero delay with intervals."""
    import json

    from benchmarks import queue_delay
    from exporters.triton_repo import parse_config

    out = tmp_path / "qd"
    assert queue_delay.main(["--onnx", str(tiny_artifacts["student_onnx"]), "--delays", "0,500", "--clients", "1,2",
                             "--preferred", "2", "--max-batch", "4", "--threads", "1", "--quick", "--workdir",
                             str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    got = {(r["delay_us"], r["preferred"], r["clients"]) for r in res["rows"]}
    assert got == {(d, p, c) for d, p in ((0, False), (500, False), (500, True)) for c in (1, 2)}
    for r in res["rows"]:
        assert r["calls"] >= 20 and r["mean_batch"] >= 1.0
        assert r["p50_vs_zero_delay"]["ci_low"] <= r["p50_vs_zero_delay"]["median"] <= r["p50_vs_zero_delay"]["ci_high"]
        if r["delay_us"] == 0:
            assert r["throughput_vs_zero_delay"]["median"] == 1.0
    cfg = parse_config(tmp_path / "work" / "repo" / "student_q500_pref" / "config.pbtxt")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert "Recommended default" in out.with_suffix(".md").read_text() or res["recommendation"] is None

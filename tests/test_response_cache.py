"""Triton's response cache for the deterministic (seed, label) -> image models: the configs that enable it, the
launcher flags, and the REAL bundled Triton answering a repeated request from its local cache."""

import time

import numpy as np
import pytest

from exporters.triton_repo import build_repository, parse_config
from serving.client import TritonImageClient
from serving.engine import ImageEngine
from serving.triton_server import TritonServer, find_tritonserver

CACHE_BYTES = 1 << 20


def test_seed_label_models_enable_the_cache_and_raw_tensor_models_do_not(tiny_artifacts, tmp_path):
    repo = tiny_artifacts["repo"]
    for name, cached in (("tiny", True), ("teacher_heun3", True), ("tiny_tensor", False), ("tiny_onnx", False)):
        assert parse_config(repo / name / "config.pbtxt").response_cache.enable is cached, name
    from onestep.cli import main

    out = tmp_path / "repo"
    assert main(["export", "triton", "--out", str(out), "--student", str(tiny_artifacts["student_onnx"]),
                 "--name", "s", "--no-response-cache"]) == 0
    for name in ("s", "s_tensor", "s_onnx"):
        assert not parse_config(out / name / "config.pbtxt").HasField("response_cache"), name


def test_launcher_starts_the_local_cache_only_when_asked(tiny_artifacts):
    _, _, caches, _ = find_tritonserver()
    assert (caches / "local" / "libtritoncache_local.so").exists()  # the wheel (and the container) ship it
    plain, _ = TritonServer(tiny_artifacts["repo"], models=["tiny"]).command()
    assert not [a for a in plain if a.startswith("--cache")]
    cached, _ = TritonServer(tiny_artifacts["repo"], models=["tiny"], response_cache_bytes=CACHE_BYTES).command()
    assert f"--cache-config=local,size={CACHE_BYTES}" in cached and f"--cache-directory={caches}" in cached
    from onestep.cli import build_parser

    args = build_parser().parse_args(["serve", "--repo", str(tiny_artifacts["repo"])])
    assert args.response_cache_mib == 64


def _cache_stats(client, model: str) -> dict:
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return {k: (int(s.get(k, {}).get("count", 0)), int(s.get(k, {}).get("ns", 0))) for k in ("cache_hit", "cache_miss")}


@pytest.fixture(scope="module")
def cached_triton(tiny_artifacts):
    with TritonServer(tiny_artifacts["repo"], models=["tiny", "tiny_tensor"], ready_timeout=90,
                      response_cache_bytes=CACHE_BYTES) as ts:
        yield ts


@pytest.mark.triton
def test_repeated_request_is_answered_from_the_cache(cached_triton, tiny_artifacts, record_property):
    """The second identical request is a cache hit (counted, with its duration, in Triton's statistics) with the
    same bytes; a different request id does not change the key, a different label does."""
    seeds, labels = [11, 12, 13], [1, 2, 3]
    c = TritonImageClient(cached_triton.grpc_url, "grpc")
    try:
        s0 = _cache_stats(c.client, "tiny")
        t = time.perf_counter()
        first = c.generate("tiny", seeds, labels, request_id="first")
        miss_ms = (time.perf_counter() - t) * 1e3
        s1 = _cache_stats(c.client, "tiny")
        assert s1["cache_miss"][0] == s0["cache_miss"][0] + 1 and s1["cache_hit"][0] == s0["cache_hit"][0]
        t = time.perf_counter()
        again = c.generate("tiny", seeds, labels, request_id="second")
        hit_ms = (time.perf_counter() - t) * 1e3
        s2 = _cache_stats(c.client, "tiny")
        assert s2["cache_hit"][0] == s1["cache_hit"][0] + 1 and s2["cache_miss"][0] == s1["cache_miss"][0]
        assert again.tobytes() == first.tobytes()
        np.testing.assert_array_equal(first, ImageEngine(tiny_artifacts["student_onnx"]).generate(seeds, labels))
        hit_us = (s2["cache_hit"][1] - s1["cache_hit"][1]) / 1e3
        lookup_miss_us = (s1["cache_miss"][1] - s0["cache_miss"][1]) / 1e3
        assert hit_us > 0
        other = c.generate("tiny", seeds, [1, 2, 4])
        assert _cache_stats(c.client, "tiny")["cache_miss"][0] == s2["cache_miss"][0] + 1
        assert other[:2].tobytes() == first[:2].tobytes()
        h = TritonImageClient(cached_triton.http_url, "http")  # the key is the inputs, whatever the protocol
        try:
            assert h.generate("tiny", seeds, labels).tobytes() == first.tobytes()
        finally:
            h.close()
        assert _cache_stats(c.client, "tiny")["cache_hit"][0] == s2["cache_hit"][0] + 1
    finally:
        c.close()
    record_property("cache_hit_us", hit_us)
    print(f"\nresponse cache: hit {hit_us:.1f} us in Triton (miss lookup+insert {lookup_miss_us:.1f} us); "
          f"client round trip {hit_ms:.2f} ms on a hit vs {miss_ms:.2f} ms on the miss")


@pytest.mark.triton
def test_raw_tensor_model_is_not_cached(cached_triton):
    from onestep.noise import seeded_noise

    c = TritonImageClient(cached_triton.grpc_url, "grpc")
    try:
        tc = c.tc
        z = seeded_noise([3], (1, 32, 32))
        outs = []
        for _ in range(2):
            inputs = [tc.InferInput("z", list(z.shape), "FP32"), tc.InferInput("labels", [1, 1], "INT64")]
            inputs[0].set_data_from_numpy(z)
            inputs[1].set_data_from_numpy(np.array([[3]], np.int64))
            outs.append(c.client.infer("tiny_tensor", inputs).as_numpy("image"))
        np.testing.assert_array_equal(outs[0], outs[1])
        assert _cache_stats(c.client, "tiny_tensor") == {"cache_hit": (0, 0), "cache_miss": (0, 0)}
    finally:
        c.close()


@pytest.mark.triton
def test_server_without_cache_serves_cache_enabled_models_uncached(tiny_artifacts):
    """The default launcher (benchmarks, tests) loads the same repository with no cache: nothing is cached."""
    with TritonServer(tiny_artifacts["repo"], models=["tiny"], ready_timeout=90) as ts:
        c = TritonImageClient(ts.grpc_url, "grpc")
        try:
            a, b = c.generate("tiny", [5], [5]), c.generate("tiny", [5], [5])
            assert a.tobytes() == b.tobytes()
            assert _cache_stats(c.client, "tiny") == {"cache_hit": (0, 0), "cache_miss": (0, 0)}
        finally:
            c.close()


@pytest.mark.triton
def test_onestep_serve_answers_a_repeated_api_request_from_the_cache(tiny_artifacts, tmp_path):
    """`onestep serve` as a user runs it: the same POST /v1/generate twice gives the same images, the second from
    Triton's cache (its per-model hit counter, proxied at /metrics/triton)."""
    import json
    import os
    import re
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from serving.triton_server import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    p = subprocess.Popen([sys.executable, "-m", "onestep.cli", "serve", "--repo", str(tiny_artifacts["repo"]),
                          "--models", "tiny", "--port", str(port), "--response-cache-mib", "1", "--drain", "0",
                          "--triton-log", str(tmp_path / "triton.log")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))

    def get(path, body=None):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"}, method="POST" if body else "GET")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def hits():
        m = re.search(r'^nv_cache_num_hits_per_model\{model="tiny",version="1"\} (\d+)', get("/metrics/triton").decode(),
                      re.M)
        return int(m.group(1)) if m else 0

    try:
        deadline = time.time() + 120
        while True:
            assert p.poll() is None, p.stdout.read()
            try:
                get("/readyz")
                break
            except (OSError, urllib.error.HTTPError):
                assert time.time() < deadline, "serve never became ready"
                time.sleep(0.5)
        body = {"model": "tiny", "seeds": [21, 22], "labels": [3, 4], "format": "png"}
        first = json.loads(get("/v1/generate", body))["images"]
        before = hits()
        second = json.loads(get("/v1/generate", body))["images"]
        assert second == first and hits() == before + 1
    finally:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    assert "response cache 1 MiB" in p.stdout.read()


@pytest.mark.triton
def test_cache_benchmark_counts_repeats_as_hits_and_new_seeds_as_misses(tiny_artifacts):
    """benchmarks/response_cache.py against the real Triton: its figures come from the requests it made."""
    from conftest import TINY_CLASS_NAMES

    from benchmarks import response_cache, stats

    method = stats.Method(min_calls=10, window_s=0.05, rounds=2, warmup_calls=1)
    f = response_cache.measure(tiny_artifacts["repo"], "tiny", len(TINY_CLASS_NAMES), method, cache_mib=1)
    assert f["hits"] == f["repeat_calls"] >= 10 and f["misses_in_repeat"] == 0
    assert f["misses_in_new"] >= 10
    assert 0 < f["triton_hit_us"]["median"] and f["triton_hit_us"]["rounds"] == 2
    assert f["round_trip_repeat_ms"]["median"] > 0 and f["new_over_repeat"]["rounds"] == 2
    text = "\n".join(response_cache.to_markdown(f))
    assert f"{f['hits']} cache hits and 0 misses" in text

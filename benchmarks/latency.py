"""Latency and throughput: the one-step student against its multi-step teacher, across backends.

Backends: PyTorch eager, torch.compile (where it works), onnxruntime (in-process, CPU or CUDA provider),
Triton over gRPC and HTTP (the real server; python backend running onnxruntime), the raw-tensor model
`student_tensor` over gRPC (z[, labels] -> image floats on the python backend) and the HTTP image API.

One measuring method for every figure (benchmarks/stats.py): warm-up, then per path at least `--min-calls`
calls and at least `--window-s` seconds, with every path of a batch size interleaved in `--rounds` rounds
(A B C A B C ...). A path's latency is the median over rounds of its per-round median; a ratio (student vs
teacher, served vs in-process) is the median of the per-round ratios; each comes with a 95% interval from a
seeded bootstrap over rounds. Stage tables come from the same calls as the total (in-process: noise, model,
encode; served: client serialisation, transport, Triton queue / compute input / infer / output from Triton's
statistics before and after each block, the API's own timings) and are checked to add up to the total.
FLOPs per image are counted with torch's FlopCounterMode on the exported network (teacher: NFE x denoiser
FLOPs); the peak is a large matmul timed in the same run (fp32 on the CPU; bf16, with fp16 and fp32 beside it,
on a GPU), so MFU = achieved FLOP/s / measured peak.

`--device cuda` times the GPU paths (benchmarks/gpu.py): PyTorch eager and torch.compile (with and without CUDA
graphs) with a synchronize after every call, onnxruntime on the CUDA provider with the served engine's options
and I/O binding (serving/engine.py), TensorRT engines where TensorRT is installed, and Triton over gRPC with a
`--kind gpu` repository; batches 1, 8, 64 and 256 by default; results in benchmarks/results/latency_gpu.*.

    python -m benchmarks.latency --student artifacts/fmnist-student.safetensors \
        --teacher artifacts/fmnist-teacher-attn.safetensors --out benchmarks/results/latency_cpu
    python -m benchmarks.latency --device cuda      # -> benchmarks/results/latency_gpu.{json,md,png}
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

from benchmarks import stats
from benchmarks.stats import Method, fmt_ci

perf = time.perf_counter


def percentiles(times_s: list[float]) -> dict:
    return stats.percentiles_ms(times_s)


def time_fn(fn, warmup: int, repeats: int, min_seconds: float = 0.0, sync=None) -> list[float]:
    """Plain timing loop (used for the matmul peak only; latency figures use stats.run_interleaved)."""
    for _ in range(warmup):
        fn()
    times = []
    t_start = perf()
    while len(times) < repeats or (perf() - t_start) < min_seconds:
        t = perf()
        fn()
        if sync:
            sync()
        times.append(perf() - t)
        if len(times) >= 10 * repeats:
            break
    return times


def measure_peak_flops(device: str = "cpu", n: int = 1024, seconds: float = 2.0) -> dict:
    """FLOP/s of a large fp32 matmul on this device in this process: the practical ceiling for the model."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = time_fn(lambda: a @ b, 3, 5, seconds, sync)
    best = min(times)
    return {"matmul_n": n, "dtype": "float32", "best_s": best, "flops_per_s": 2 * n**3 / best,
            "threads": torch.get_num_threads()}


def mfu_figures(flops_per_image: float, batch: int, seconds: float, peaks: dict[str, float]) -> dict:
    """Images/s, achieved FLOP/s and, per named peak (FLOP/s), the fraction of it reached by a call of `batch`
    images taking `seconds`."""
    achieved = flops_per_image * batch / seconds
    return {"images_per_s": batch / seconds, "achieved_flops_per_s": achieved,
            "mfu": {name: achieved / peak for name, peak in peaks.items()}}


def count_flops(module, *args) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*args)
    return int(fc.get_total_flops())


STAT_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")
STAGE_NAMES = {"queue": "Triton queue", "compute_input": "Triton compute input",
               "compute_infer": "Triton compute infer", "compute_output": "Triton compute output"}


def triton_statistics(client, model: str) -> dict:
    """Cumulative (count, ns) per statistic of one model, from Triton's statistics extension (gRPC client)."""
    js = client.get_inference_statistics(model, as_json=True)
    ms = js["model_stats"][0]
    inf = ms.get("inference_stats", {})
    out = {k: (int(inf.get(k, {}).get("count", 0)), int(inf.get(k, {}).get("ns", 0))) for k in STAT_KEYS}
    out["inference_count"] = int(ms.get("inference_count", 0))
    out["execution_count"] = int(ms.get("execution_count", 0))
    return out


def statistics_delta(before: dict, after: dict, calls: int) -> dict:
    """What Triton counted between two snapshots: requests, executions and per-request mean seconds."""
    n = after["success"][0] - before["success"][0]
    per = {k: ((after[k][1] - before[k][1]) / n / 1e9 if n else float("nan")) for k in STAT_KEYS}
    return {"requests": n, "calls": calls, "per_request_s": per,
            "executions": after["execution_count"] - before["execution_count"],
            "inferences": after["inference_count"] - before["inference_count"]}


def statistics_after(client, model: str, before: dict, calls: int, timeout_s: float = 2.0) -> dict:
    """Triton's statistics once they hold the block's `calls` requests: Triton records a request after its
    response has gone out, so a snapshot taken the moment the client has its answer can miss the last one."""
    deadline = time.perf_counter() + timeout_s
    while True:
        after = triton_statistics(client, model)
        if after["success"][0] - before["success"][0] >= calls or time.perf_counter() > deadline:
            return statistics_delta(before, after, calls)
        time.sleep(0.001)


def statistics_hook(client, model: str):
    """(before, after) for stats.run_interleaved: Triton's statistics around each timed block."""
    return (lambda: triton_statistics(client, model),
            lambda token, calls: statistics_after(client, model, token, calls))


def triton_call(tic, model: str, seeds: np.ndarray, labels: np.ndarray | None) -> dict:
    """One SEED[, LABEL] -> IMAGE request, as TritonImageClient.generate makes it, with its stages timed."""
    tc = tic.tc
    t0 = perf()
    inputs = [tc.InferInput("SEED", list(seeds.shape), "INT64")]
    inputs[0].set_data_from_numpy(seeds)
    if labels is not None:
        inputs.append(tc.InferInput("LABEL", list(labels.shape), "INT64"))
        inputs[1].set_data_from_numpy(labels)
    outputs = [tc.InferRequestedOutput("IMAGE")]
    t1 = perf()
    r = tic.client.infer(model, inputs, outputs=outputs)
    t2 = perf()
    r.as_numpy("IMAGE")
    t3 = perf()
    return {"serialise": t1 - t0, "infer_call": t2 - t1, "deserialise": t3 - t2}


def tensor_call(tic, model: str, seeds: list[int], shape, labels: np.ndarray | None, names: tuple) -> dict:
    """One z[, labels] -> image request to the raw-tensor model; the client makes the noise."""
    from onestep.noise import seeded_noise

    tc = tic.tc
    t0 = perf()
    z = seeded_noise(seeds, shape)
    t1 = perf()
    inputs = [tc.InferInput(names[0], list(z.shape), "FP32")]
    inputs[0].set_data_from_numpy(z)
    if labels is not None:
        inputs.append(tc.InferInput(names[1], list(labels.shape), "INT64"))
        inputs[1].set_data_from_numpy(labels)
    outputs = [tc.InferRequestedOutput(names[-1])]
    t2 = perf()
    r = tic.client.infer(model, inputs, outputs=outputs)
    t3 = perf()
    r.as_numpy(names[-1])
    t4 = perf()
    return {"noise": t1 - t0, "serialise": t2 - t1, "infer_call": t3 - t2, "deserialise": t4 - t3}


def parse_server_timing(header: str | None) -> dict:
    """'parse;dur=0.12, triton;dur=7.9' -> {'parse': 0.12e-3, 'triton': 7.9e-3} (seconds)."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        for kv in rest.split(";"):
            k, _, v = kv.strip().partition("=")
            if k == "dur" and name:
                try:
                    dur = float(v) / 1e3
                except ValueError:  # a malformed entry is left out, the others are kept
                    continue
                out[name.strip()] = dur
    return out


class APIConnection:
    """One keep-alive HTTP/1.1 connection to the API, as a production client (or tritonclient.http, for the
    triton-http path) holds it: the measured time is the request's, not a TCP handshake's. Reopened after an
    error."""

    def __init__(self, url: str, timeout: float = 120.0):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[bytes, str | None]:
        """(response body, Server-Timing header) of a POST that must answer 200. A kept-alive connection the
        server has closed while idle (uvicorn: after 5 s) is reopened once, as HTTP clients do."""
        for attempt in (0, 1):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body, {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                payload = r.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.close()
                if not reused or attempt:
                    raise
            except Exception:
                self.close()
                raise
        if r.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {r.status}: {payload[:300]!r}")
        return payload, r.getheader("Server-Timing")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def api_call(conn: APIConnection, body: dict) -> dict:
    """One POST /v1/generate (JSON response, base64 images) on a kept-alive connection, with its stages timed.
    The API's own timings come from a Server-Timing header when it sends one, else from `timings_ms` in the
    body."""
    t0 = perf()
    data = json.dumps(body).encode()
    t1 = perf()
    payload, header = conn.post("/v1/generate", data)
    t2 = perf()
    out = json.loads(payload)
    for im in out["images"]:
        base64.b64decode(im["data"])
    t3 = perf()
    timing = {k: v / 1e3 for k, v in (out.get("timings_ms") or {}).items()}
    timing.update(parse_server_timing(header))
    st = {"serialise": t1 - t0, "request": t2 - t1, "deserialise": t3 - t2,
          "api_triton": timing.get("triton", 0.0), "api_encode": timing.get("encode", 0.0)}
    for k in ("parse", "queue", "total"):  # total: the handler, from its start to its answer
        if k in timing:
            st[f"api_{k}"] = timing[k]
    return st


def served_stage_rounds(pr: stats.PathResult) -> tuple[dict[str, list[float]], list[str]]:
    """Per-round stage means (s) of a served path, in request order, from the client's marks and Triton's
    statistics of the same calls; and the problems found (Triton counted other requests than the calls)."""
    raw = {k: np.asarray(v) for k, v in pr.stage_round_means().items()}
    per = [e["per_request_s"] for e in pr.extra]
    srv = {k: np.asarray([p[k] for p in per]) for k in STAT_KEYS}
    problems = [f"round {i}: Triton counted {e['requests']} requests for {e['calls']} calls"
                for i, e in enumerate(pr.extra) if e["requests"] != e["calls"]]
    out: dict[str, np.ndarray] = {}
    if "noise" in raw:
        out["client noise"] = raw["noise"]
    out["client serialise"] = raw["serialise"]
    if "request" in raw:  # through the HTTP API
        handler = raw["api_total"] if "api_total" in raw else raw["api_triton"] + raw["api_encode"]
        parse = raw.get("api_parse", 0.0)
        out["HTTP + API framework" + ("" if "api_parse" in raw else " + parse")] = raw["request"] - handler - parse
        if "api_parse" in raw:
            out["API parse"] = raw["api_parse"]
        if "api_queue" in raw:
            out["API pool queue"] = raw["api_queue"]
        if "api_total" in raw:
            out["API thread hand-off + response"] = (raw["api_total"] - parse - raw.get("api_queue", 0.0)
                                                     - raw["api_triton"] - raw["api_encode"])
        out["API gRPC client + transport"] = raw["api_triton"] - srv["success"]
    else:
        out["transport"] = raw["infer_call"] - srv["success"]
    for k, label in STAGE_NAMES.items():
        out[label] = srv[k]
    out["Triton request outside queue + compute"] = srv["success"] - sum(srv[k] for k in STAGE_NAMES)
    if "api_encode" in raw:
        out["API encode"] = raw["api_encode"]
    out["client deserialise"] = raw["deserialise"]
    return {k: [float(x) for x in v] for k, v in out.items()}, problems


def method_from_args(args) -> Method:
    if args.quick:
        q = Method.quick_method()
        return Method(min_calls=min(args.min_calls, q.min_calls), window_s=min(args.window_s, q.window_s),
                      rounds=min(args.rounds, q.rounds), warmup_calls=min(args.warmup, q.warmup_calls), quick=True)
    return Method(min_calls=args.min_calls, window_s=args.window_s, rounds=args.rounds, warmup_calls=args.warmup)


def run(args) -> dict:
    import torch

    from exporters.onnx_export import export_onnx
    from exporters.triton_repo import build_repository
    from onestep.checkpoint import image_shape, load_model, load_teacher, save_model
    from onestep.noise import seeded_noise
    from benchmarks.report import load_average
    from onestep.provenance import git_revision, machine_info, package_versions
    from onestep.samplers import make_sigmas, nfe, sample_euler, sample_heun
    from serving.engine import ImageEngine, to_uint8

    cuda = args.device == "cuda"
    if cuda:
        from benchmarks import gpu

        gpu.require_cuda()  # before anything is loaded: a clear refusal, never a CPU figure labelled GPU
    torch.set_num_threads(args.threads) if args.threads else None
    method = method_from_args(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="onestep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    student, smeta = load_model(args.student)
    teacher, tmeta = load_teacher(args.teacher)  # our checkpoint or a diffusers model folder
    teacher_ckpt = Path(args.teacher)
    if teacher_ckpt.is_dir():  # a diffusers folder: export goes through a checkpoint of the same weights
        teacher_ckpt = work / "teacher.safetensors"
        if not teacher_ckpt.exists():
            save_model(teacher_ckpt, teacher, tmeta["model"], extra={"source": tmeta.get("source")})
    points = [(p.split(":")[0], int(p.split(":")[1])) for p in args.teacher_points.split(",") if p]
    batches = [int(b) for b in args.batches.split(",")]
    shape = tuple(image_shape(smeta["model"]))  # any model kind, any channel count and resolution
    if tuple(image_shape(tmeta["model"])) != shape:
        raise ValueError(f"student images {shape} and teacher images {tuple(image_shape(tmeta['model']))} differ: "
                         f"benchmark a student against its own teacher")
    n_cls = int(getattr(student, "num_classes", 0))
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    res: dict = {"machine": machine_info(), "versions": package_versions(), "git_revision": git_revision(),
                 "command": ("onestep " if sys.argv[0].endswith("onestep") else "python -m benchmarks.latency ")
                 + " ".join(sys.argv[1:]), "torch_threads": torch.get_num_threads(), "student": str(args.student),
                 "teacher": str(args.teacher), "student_method": smeta.get("method"), "method": method.as_dict(),
                 "method_text": method.describe(), "rows": [], "ratios": [], "stage_tables": {}, "problems": [],
                 "load_average_start": load_average(), "device": args.device, "notes": []}
    if cuda:
        res["machine"].update(gpu.gpu_info())
        res["peaks"] = gpu.measure_peaks(args.matmul_n, seconds=0.3 if method.quick else 2.0)
        res["peak"] = res["peaks"][gpu.REFERENCE_DTYPE]
        res["notes"] += [
            "GPU timing: torch paths synchronize after every call (stages: enqueue on the host, then the wait for "
            "the GPU); onnxruntime and TensorRT copy the result back to the host inside the call.",
            f"torch.compile: `compile` = mode {gpu.COMPILE_MODES['compile']!r}, `compile-cudagraphs` = mode "
            f"{gpu.COMPILE_MODES['compile-cudagraphs']!r} (CUDA graphs), dynamic=False. CUDA graphs cover one "
            "network call: the student is one replay per batch; the teacher's multi-step loop stays in Python, one "
            "replay per NFE with the sampler's element-wise steps between them.",
            f"MFU against the {gpu.REFERENCE_DTYPE} matmul peak; the networks run in fp32 (TensorRT: "
            f"{args.trt_precision}), so the fp32 column is the like-for-like ceiling."]
    else:
        res["peak"] = measure_peak_flops("cpu", seconds=0.3 if method.quick else 2.0)
    z1 = torch.from_numpy(seeded_noise([0], shape))
    l1 = torch.tensor([0]) if n_cls else None
    f_student = count_flops(student, z1, l1)
    s_probe = min(80.0, float(teacher.sigma_max))
    f_denoiser = count_flops(teacher, z1 * s_probe, torch.tensor([s_probe]), l1)
    res["flops_per_image"] = {"student": f_student, "teacher_denoiser_call": f_denoiser}
    print(json.dumps({"peak_gflops": res["peak"]["flops_per_s"] / 1e9, "student_mflops": f_student / 1e6,
                      "method": method.describe()}), flush=True)
    models = [("student", 1, None, None)] + [(f"teacher_{s}{n}", nfe(s, n), s, n) for s, n in points]
    nfe_of = {m[0]: m[1] for m in models}

    # --- everything set up first, so that every path of a batch size can be interleaved in the same rounds
    mods = {}
    skipped = res.setdefault("skipped", {})
    dev = "cuda" if cuda else "cpu"
    torch_backends = [b for b in backends if b in ("eager", "compile", "compile-cudagraphs")]
    if cuda and torch_backends:
        student.to(dev)
        teacher.to(dev)
    for backend in torch_backends:
        if backend == "eager":
            mods[backend] = (student, teacher)
            continue
        try:
            mods[backend] = gpu.compile_pair(backend, student, teacher) if cuda else \
                (torch.compile(student), torch.compile(teacher))
            with torch.no_grad():
                mods[backend][0](z1.to(dev), None if l1 is None else l1.to(dev))
        except Exception as e:  # compile needs a C++ toolchain; say why it was skipped
            mods.pop(backend, None)
            skipped[backend] = f"{type(e).__name__}: {str(e)[:200]}"
    s_onnx, t_onnx = work / "student.onnx", work / "teacher.onnx"
    if not s_onnx.exists():
        export_onnx(args.student, s_onnx)
    if not t_onnx.exists():
        export_onnx(teacher_ckpt, t_onnx)
    providers = args.providers.split(",")
    served = [b for b in backends if b in ("triton-grpc", "triton-http", "triton-tensor", "api")]
    ort_problem = gpu.onnxruntime_cuda_problem() if cuda else None
    engines = {}
    if "onnxruntime" in backends and not ort_problem:
        from serving.engine import ProviderError

        try:
            engines["student"] = ImageEngine(s_onnx, providers, intra_op_threads=args.threads)
            for name, k, smp, steps in models[1:]:
                engines[name] = ImageEngine(t_onnx, providers, smp, steps, intra_op_threads=args.threads)
        except ProviderError as e:
            if not cuda:
                raise
            ort_problem, engines = str(e), {}
    if ort_problem:  # the served models run the same onnxruntime provider inside Triton
        for b in ["onnxruntime"] + served:
            if b in backends:
                skipped[b] = ort_problem
        backends = [b for b in backends if b not in skipped]
        served = []
        if args.concurrency:
            skipped["concurrency sweep"] = ort_problem
            args.concurrency = ""
    trt = {}
    if "tensorrt" in backends:
        why = gpu.tensorrt_problem()
        if why is None:
            try:
                trt, res["tensorrt"] = gpu.tensorrt_engines(s_onnx, t_onnx, [(m[0], m[2], m[3]) for m in models[1:]],
                                                            work / "tensorrt", args.trt_precision, max(batches))
            except Exception as e:  # a parser or builder failure: the row says why, the other backends go on
                why = f"{type(e).__name__}: {str(e)[:300]}"
        if why:
            skipped["tensorrt"] = why
            backends = [b for b in backends if b != "tensorrt"]
    ts = api_srv = api_conn = None
    try:
        if served or args.concurrency:
            from serving.client import TritonImageClient
            from serving.triton_server import TritonServer

            repo = work / "repo"
            levels = [int(c) for c in args.concurrency.split(",") if c]
            man = build_repository(repo, s_onnx, "student", t_onnx, tuple((s, n) for s, n in points),
                                   max_batch=args.max_batch or max(batches + levels), max_queue_delay_us=args.queue_delay_us,
                                   onnx_providers=args.providers, intra_op_threads=args.threads,
                                   intra_op_spinning=args.served_spinning,
                                   kind="gpu" if "CUDAExecutionProvider" in args.providers else "cpu",
                                   with_onnx_platform=False)
            res["repository_batching"] = man["batching"]
            ts = TritonServer(repo, ready_timeout=600).start()
            stat_client = TritonImageClient(ts.grpc_url, "grpc").client
            clients = {"triton-grpc": TritonImageClient(ts.grpc_url, "grpc"),
                       "triton-http": TritonImageClient(ts.http_url, "http"),
                       "triton-tensor": TritonImageClient(ts.grpc_url, "grpc")}
            tensor_names = (*man["models"]["student_tensor"]["inputs"], man["models"]["student_tensor"]["outputs"][0])
            if "api" in served:
                api_srv = _start_api(ts, repo, work / "api.log")
                api_conn = APIConnection(api_srv.url)
        for b in batches:
            seeds = list(range(b))
            lab_np = (np.arange(b) % n_cls).astype(np.int64) if n_cls else None
            z = seeded_noise(seeds, shape)
            zt = torch.from_numpy(z).to(dev)
            lab_t = torch.from_numpy(lab_np).to(dev) if n_cls else None
            paths, hooks = {}, {}
            for backend in backends:
                for name, k, smp, steps in models:
                    key = f"{backend}|{name}"
                    if backend in mods:
                        s_mod, t_mod = mods[backend]
                        if name == "student":
                            fn = (lambda m=s_mod: _no_grad(m, zt, lab_t))
                        else:
                            sig = make_sigmas("karras", steps, teacher.sigma_min, teacher.sigma_max)
                            sampler = sample_heun if smp == "heun" else sample_euler
                            fn = (lambda m=t_mod, sig=sig, sampler=sampler: _no_grad_sample(sampler, m, zt, sig, lab_t))
                        if cuda:
                            fn = gpu.synced(fn)
                            if backend != "eager":  # compiles this batch size now; a failure skips the path only
                                try:
                                    fn()
                                except Exception as e:
                                    skipped[f"{key} batch {b}"] = f"{type(e).__name__}: {str(e)[:200]}"
                                    continue
                    elif backend in ("onnxruntime", "tensorrt"):
                        eng = engines[name] if backend == "onnxruntime" else trt[name]
                        fn = (lambda eng=eng: _inprocess_call(eng, seeds, shape, lab_np, seeded_noise, to_uint8))
                    elif backend in ("triton-grpc", "triton-http"):
                        s_a = np.asarray(seeds, np.int64).reshape(-1, 1)
                        l_a = lab_np.reshape(-1, 1) if n_cls else None
                        fn = (lambda c=clients[backend], m=name, s_a=s_a, l_a=l_a: triton_call(c, m, s_a, l_a))
                        hooks[key] = statistics_hook(stat_client, name)
                    elif backend == "triton-tensor":
                        if name != "student":
                            continue  # the raw-tensor contract is the student graph's
                        l_a = lab_np.reshape(-1, 1) if n_cls else None
                        fn = (lambda c=clients[backend], l_a=l_a: tensor_call(c, "student_tensor", seeds, shape, l_a,
                                                                             tensor_names))
                        hooks[key] = statistics_hook(stat_client, "student_tensor")
                    elif backend == "api":
                        if b > 64:
                            continue
                        body = {"model": name, "seeds": seeds, "format": "png"}
                        if n_cls:
                            body["labels"] = [int(x) for x in lab_np]
                        fn = (lambda body=body: api_call(api_conn, body))
                        hooks[key] = statistics_hook(stat_client, name)
                    else:
                        continue
                    paths[key] = fn
            print(json.dumps({"batch": b, "paths": list(paths), "rounds": method.rounds}), flush=True)
            results = stats.run_interleaved(paths, method, hooks, log=lambda t: print(t, flush=True))
            _collect(res, results, b, nfe_of, f_student, f_denoiser)
        if args.concurrency and ts is not None:
            from benchmarks.queue_delay import concurrency_sweep

            res["concurrency"] = concurrency_sweep(ts.grpc_url, "student", [int(c) for c in args.concurrency.split(",")],
                                                   n_cls, method)
        if args.response_cache_mib and "triton-grpc" in served and ts is not None:
            from benchmarks import response_cache

            if api_conn is not None:  # the cached server runs alone
                api_conn.close()
                api_conn = None
            if api_srv is not None:
                api_srv.stop()
                api_srv = None
            ts.stop()
            ts = None
            res["response_cache"] = response_cache.measure(repo, "student", n_cls, method, args.response_cache_mib)
            print(json.dumps({"response_cache": res["response_cache"]["triton_hit_us"]}), flush=True)
    finally:
        if api_conn is not None:
            api_conn.close()
        if api_srv is not None:
            api_srv.stop()
        if ts is not None:
            ts.stop()
    res["load_average_end"] = load_average()
    res["summary"] = summarise(res)
    return res


BACKENDS = ("eager", "compile", "compile-cudagraphs", "onnxruntime", "tensorrt", "triton-grpc", "triton-http",
            "triton-tensor", "api")
CPU_BACKENDS = "eager,onnxruntime,triton-grpc,triton-http,triton-tensor,api"


def _no_grad(m, z, lab):
    import torch

    with torch.no_grad():
        m(z, lab)


def _no_grad_sample(sampler, m, z, sig, lab):
    import torch

    with torch.no_grad():
        sampler(m, z, sig, lab)


def _inprocess_call(eng, seeds, shape, labels, seeded_noise, to_uint8) -> dict:
    """What the served model does for one batch, in this process: noise, model, encode (to uint8)."""
    t0 = perf()
    z = seeded_noise(seeds, shape)
    t1 = perf()
    x = eng.model_output(z, labels)
    t2 = perf()
    to_uint8(x)
    t3 = perf()
    return {"noise": t1 - t0, "model": t2 - t1, "encode (uint8)": t3 - t2}


def _collect(res: dict, results: dict[str, stats.PathResult], batch: int, nfe_of: dict, f_student: int,
             f_denoiser: int) -> None:
    """Rows, stage tables and ratios of one interleaved group (one batch size)."""
    rounds_ms = {}
    for key, pr in results.items():
        backend, model = key.split("|")
        k = nfe_of[model]
        med = np.asarray(pr.round_medians()) * 1e3
        rounds_ms[key] = med
        e = stats.estimate(med)
        row = {"backend": backend, "model": model, "nfe": k, "batch": batch, **percentiles(pr.all_calls()),
               "p50_ms": e["median"], "p50_ci_ms": [e["ci_low"], e["ci_high"]], "round_spread": e["spread"],
               "large_spread": e["large_spread"], "round_medians_ms": [float(x) for x in med]}
        per_image = f_student if k == 1 and model == "student" else f_denoiser * k
        peaks = {"reference": res["peak"]["flops_per_s"],
                 **{dt: p["flops_per_s"] for dt, p in (res.get("peaks") or {}).items()}}
        m = mfu_figures(per_image, batch, e["median"] / 1e3, peaks)
        row["images_per_s"] = m["images_per_s"]
        row["achieved_gflops"] = m["achieved_flops_per_s"] / 1e9
        row["mfu"] = m["mfu"].pop("reference")
        if m["mfu"]:
            row["mfu_by_peak"] = m["mfu"]
        stage_rounds, problems = None, []
        if pr.extra and pr.extra[0]:
            stage_rounds, problems = served_stage_rounds(pr)
        else:  # in-process paths: onnxruntime and TensorRT (noise, model, encode), torch on a GPU (enqueue, wait)
            stage_rounds = pr.stage_round_means() or None
        if stage_rounds:
            table = stats.stage_table(pr.round_means(), stage_rounds)
            if problems:
                table["adds_up"] = False
                table["problems"] = problems
                res["problems"] += [f"{key} batch {batch}: {p}" for p in problems]
            res["stage_tables"][f"{backend}/{model}/batch{batch}"] = table
            row["stages_ms"] = {s: v["median"] for s, v in table["stages_ms"].items()}
            if pr.extra and pr.extra[0]:
                ex = sum(e["executions"] for e in pr.extra)
                row["triton_mean_batch"] = sum(e["inferences"] for e in pr.extra) / ex if ex else None
        res["rows"].append(row)
        print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()
                          if k2 not in ("stages_ms", "round_medians_ms")}), flush=True)
    for key, med in rounds_ms.items():  # student speed-ups: teacher / student, same backend
        backend, model = key.split("|")
        sk = f"{backend}|student"
        if model != "student" and sk in rounds_ms:
            r = stats.ratio(med, rounds_ms[sk])
            res["ratios"].append({"kind": "speedup", "batch": batch, "backend": backend, "numerator": key,
                                  "denominator": sk, "nfe": nfe_of[model], **r})
    base = rounds_ms.get("onnxruntime|student")
    if base is not None:  # served overhead: served / in-process, student
        for key, med in rounds_ms.items():
            backend, model = key.split("|")
            if model == "student" and backend in ("triton-grpc", "triton-http", "triton-tensor", "api"):
                res["ratios"].append({"kind": "served_overhead", "batch": batch, "backend": backend,
                                      "numerator": key, "denominator": "onnxruntime|student",
                                      **stats.ratio(med, base)})


def summarise(res: dict) -> dict:
    """Speed-ups and served overheads (medians of per-round ratios, with intervals), the best MFU and the
    checks: stage tables that do not add up, figures whose rounds disagree."""
    speedups = [{"backend": r["backend"], "batch": r["batch"], "teacher": r["numerator"].split("|")[1],
                 "nfe": r["nfe"], "speedup": r["median"], "ci": [r["ci_low"], r["ci_high"]],
                 "speedup_over_nfe": r["median"] / r["nfe"], "large_spread": r["large_spread"]}
                for r in res["ratios"] if r["kind"] == "speedup"]
    overhead = {f"{r['backend']}/batch{r['batch']}": {"ratio": r["median"], "ci": [r["ci_low"], r["ci_high"]]}
                for r in res["ratios"] if r["kind"] == "served_overhead"}
    best = max((r for r in res["rows"] if r["model"] == "student"), key=lambda r: r["mfu"], default=None)
    spread = {f"{r['backend']}/{r['model']}/batch{r['batch']}": {"spread": r["round_spread"],
                                                                 "large_spread": r["large_spread"]}
              for r in res["rows"]}
    spread.update({f"ratio {r['numerator']} / {r['denominator']} batch{r['batch']}": r for r in res["ratios"]})
    return {"speedups": speedups, "served_overhead_vs_onnxruntime": overhead,
            "stages_do_not_add_up": stats.failed_sums(res["stage_tables"]),
            "large_spread": stats.spread_notes(spread),
            "best_student_mfu": None if best is None else {k: best[k] for k in ("backend", "batch", "mfu",
                                                                                  "achieved_gflops")}}


def to_markdown(res: dict) -> str:
    from benchmarks.report import header_lines

    summ = res["summary"]
    lines = header_lines("Latency: one-step student vs multi-step teacher", res, summ["stages_do_not_add_up"],
                         summ["large_spread"])
    flops_text = (f"FLOPs per image: student {res['flops_per_image']['student']/1e6:.1f} MFLOP; teacher "
                  f"{res['flops_per_image']['teacher_denoiser_call']/1e6:.1f} MFLOP per NFE.")
    peaks = res.get("peaks")
    if peaks:  # a GPU run: the reference peak and the others, all timed in this run
        ref = res["peak"]
        others = ", ".join(f"{dt} {p['flops_per_s']/1e12:.1f}" for dt, p in peaks.items() if dt != ref["dtype"])
        lines += [f"Device: {res['machine'].get('gpu')} (driver {res['machine'].get('gpu_driver')}, CUDA "
                  f"{res['machine'].get('cuda_torch')} in torch, driver API {res['machine'].get('cuda_driver_api')}). "
                  f"Peak ({ref['dtype']} matmul {ref['matmul_n']}^3, same run, {ref['timer']}): "
                  f"{ref['flops_per_s']/1e12:.1f} TFLOP/s (others, TFLOP/s: {others}). {flops_text}", ""]
    else:
        lines += [f"Torch threads {res['torch_threads']}; peak (fp32 matmul {res['peak']['matmul_n']}^3, same run): "
                  f"{res['peak']['flops_per_s']/1e9:.1f} GFLOP/s. {flops_text}", ""]
    for note in res.get("notes") or []:
        lines.append(f"- {note}")
    if res.get("notes"):
        lines.append("")
    if res.get("tensorrt"):
        for role, t in res["tensorrt"].items():
            lines.append(f"TensorRT {role} engine: {t['precision']}, profile {t['profile']}, max abs error vs "
                         f"onnxruntime {(t.get('parity') or {}).get('max_abs_err_vs_onnxruntime')}, "
                         f"{'from the engine cache' if t.get('cache_hit') else 'built in this run'}.")
        lines.append("")
    if res.get("repository_batching"):
        bt = res["repository_batching"]
        lines += [f"Served models: dynamic batching, queue delay {bt['max_queue_delay_us']} us, max batch "
                  f"{bt['max_batch']}, {bt['instances']} instance(s), onnxruntime intra-op spinning "
                  f"{'on' if bt.get('intra_op_spinning', True) else 'off'}. Triton paths: tritonclient (gRPC or HTTP, "
                  "one client each). API path: the HTTP API in a process of its own (as `onestep serve` runs it), "
                  "gRPC to the same Triton, called over one kept-alive HTTP/1.1 connection.", ""]
    mfu_head = (f"MFU ({res['peak']['dtype']} peak) | MFU (fp32 peak) |" if peaks else "MFU |")
    lines += ["p50 = median over rounds of each round's median call [95% CI]; p95/p99 over all calls.", "",
              f"| backend | model | NFE | batch | p50 ms [95% CI] | p95 ms | p99 ms | calls | images/s | {mfu_head}",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if peaks else "")]
    for r in res["rows"]:
        ci = f"{r['p50_ms']:.2f} [{r['p50_ci_ms'][0]:.2f}, {r['p50_ci_ms'][1]:.2f}]"
        mfu = (f"{r['mfu']*100:.3f}% | {r.get('mfu_by_peak', {}).get('float32', float('nan'))*100:.3f}% |" if peaks
               else f"{r['mfu']*100:.1f}% |")
        lines.append(f"| {r['backend']} | {r['model']} | {r['nfe']} | {r['batch']} | {ci} | {r['p95_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['runs']} | {r['images_per_s']:.1f} | {mfu}")
    lines += ["", "## Speed-up of the student (teacher / student, median of per-round ratios [95% CI])", "",
              "| backend | batch | teacher | NFE | speed-up | speed-up / NFE |", "|---|---|---|---|---|---|"]
    for s in summ["speedups"]:
        e = {"median": s["speedup"], "ci_low": s["ci"][0], "ci_high": s["ci"][1]}
        lines.append(f"| {s['backend']} | {s['batch']} | {s['teacher']} | {s['nfe']} | {fmt_ci(e, '.2f', 'x')} | "
                     f"{s['speedup_over_nfe']:.2f} |")
    if summ["served_overhead_vs_onnxruntime"]:
        lines += ["", "## Served overhead (served / in-process onnxruntime, student, median of per-round ratios "
                  "[95% CI])", ""]
        for k, v in sorted(summ["served_overhead_vs_onnxruntime"].items()):
            e = {"median": v["ratio"], "ci_low": v["ci"][0], "ci_high": v["ci"][1]}
            lines.append(f"- {k}: {fmt_ci(e, '.2f', 'x')}")
    if res["stage_tables"]:
        lines += ["", "## Stages (ms per call, median over rounds of per-round means, from the same calls as the "
                  "total)", ""]
        for name, t in res["stage_tables"].items():
            verdict = "add up" if t["adds_up"] else "DO NOT add up"
            lines += [f"### {name}: stages {verdict} (sum {t['sum_ms']['median']:.3f} ms, total "
                      f"{fmt_ci(t['total_ms'], '.3f')} ms)", "", "| stage | ms [95% CI] |", "|---|---|"]
            for s in t.get("order", list(t["stages_ms"])):  # request order (JSON files sort keys)
                lines.append(f"| {s} | {fmt_ci(t['stages_ms'][s], '.3f')} |")
            lines.append(f"| **total** | {fmt_ci(t['total_ms'], '.3f')} |")
            lines.append(f"| unaccounted (total - stages) | {fmt_ci(t['unaccounted_ms'], '.3f')} |")
            for p in t.get("problems", []):
                lines.append(f"\nProblem: {p}")
            lines.append("")
    if res.get("concurrency"):
        lines += ["## Concurrency sweep (student, Triton gRPC, batch 1 per request, closed loop)", "",
                  "| clients | images/s [95% CI] | p50 ms [95% CI] | p99 ms |", "|---|---|---|---|"]
        for c in res["concurrency"]:
            lines.append(f"| {c['concurrency']} | {fmt_ci(c['images_per_s'], '.1f')} | {fmt_ci(c['p50_ms'], '.2f')} "
                         f"| {c['p99_ms']:.2f} |")
    if res.get("response_cache"):
        from benchmarks import response_cache

        lines += [""] + response_cache.to_markdown(res["response_cache"])
    if res.get("skipped"):
        lines += ["", "## Not measured", "", "| backend / path | why |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in res["skipped"].items()]
    lines += ["", f"Command: `{res['command']}`  ", f"Revision: {res['git_revision']}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_batch = res.get("device") == "cuda" and len({r["batch"] for r in res["rows"]}) > 1
    if by_batch:  # a GPU run: latency vs NFE at batch 1, and the student's throughput vs batch
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for backend in sorted({r["backend"] for r in res["rows"]}):
            rows = sorted((r for r in res["rows"] if r["backend"] == backend and r["model"] == "student"),
                          key=lambda r: r["batch"])
            if rows:
                ax2.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=backend)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("batch")
        ax2.set_ylabel("student images/s (batch / p50)")
        ax2.set_title(f"Student throughput, {res['machine'].get('gpu', 'GPU')}")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["backend"] == backend and r["batch"] == 1]
        if not rows:
            continue
        rows.sort(key=lambda r: r["nfe"])
        ax.errorbar([r["nfe"] for r in rows], [r["p50_ms"] for r in rows], fmt="o-", label=backend,
                    yerr=[[r["p50_ms"] - r["p50_ci_ms"][0] for r in rows], [r["p50_ci_ms"][1] - r["p50_ms"] for r in rows]])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE); 1 = the student")
    ax.set_ylabel("p50 latency, batch 1 (ms)")
    ax.set_title("Student (1 NFE) vs teacher (N NFE), same network")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _start_api(ts, repo, log_path=None):
    """The HTTP API in a process of its own, as `onestep serve` runs it (no interpreter lock shared with the
    measuring client), talking gRPC to the benchmark's Triton."""
    from serving.api import APISettings
    from serving.background import APIProcess

    return APIProcess(APISettings(triton_url=ts.grpc_url, repository=str(repo), max_images=256, max_inflight=256),
                      log_path=str(log_path) if log_path else None).start()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from exporters.triton_repo import DEFAULT_MAX_QUEUE_DELAY_US

    ap.add_argument("--student", default="artifacts/fmnist-student.safetensors")
    ap.add_argument("--teacher", default="artifacts/fmnist-teacher-attn.safetensors",
                    help="the student's teacher: our checkpoint or a diffusers model folder")
    ap.add_argument("--teacher-points", default="euler:2,euler:8,heun:18",
                    help="teacher sampler:steps points (NFE = steps for euler, 2*steps-1 for heun)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default) or cuda: the GPU paths, which refuse to run without a CUDA device")
    ap.add_argument("--batches", default=None, help="comma list (default: 1,16 on cpu, 1,8,64,256 on cuda)")
    ap.add_argument("--backends", default=None,
                    help=f"comma list of {', '.join(BACKENDS)} (default: {CPU_BACKENDS} on cpu; "
                         "eager,compile,compile-cudagraphs,onnxruntime,tensorrt,triton-grpc on cuda); "
                         "compile-cudagraphs and tensorrt need cuda")
    ap.add_argument("--providers", default=None,
                    help="onnxruntime execution providers, all required (default: CPUExecutionProvider on cpu, "
                         "CUDAExecutionProvider,CPUExecutionProvider on cuda, as `onestep export triton --kind gpu`)")
    ap.add_argument("--matmul-n", type=int, default=8192, help="cuda: size of the bf16/fp16/fp32 peak matmul")
    ap.add_argument("--trt-precision", choices=("fp32", "fp16", "bf16"), default="fp16",
                    help="cuda: precision of the TensorRT engines")
    ap.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0 = default)")
    ap.add_argument("--served-spinning", default=True, action=argparse.BooleanOptionalAction,
                    help="the served models' onnxruntime intra-op threads busy-wait (default) or sleep between "
                         "operators (`onestep export triton --no-intra-op-spinning`); in-process paths keep the default")
    ap.add_argument("--min-calls", type=int, default=200, help="timed calls per path, at least")
    ap.add_argument("--window-s", type=float, default=10.0, help="timed seconds per path, at least")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds the calls are split into")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up calls per path")
    ap.add_argument("--queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US)
    ap.add_argument("--max-batch", type=int, default=0,
                    help="max batch of the served models (0 = the largest of --batches and --concurrency)")
    ap.add_argument("--response-cache-mib", type=int, default=64,
                    help="then time a repeated vs a new request on a Triton with this response cache (0 = skip)")
    ap.add_argument("--concurrency", default="1,4,16", help="client counts for the served sweep ('' = none)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batch 1 (1 and 8 on cuda), two teacher points, the same method with short windows "
                         "(figures indicative only)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="output stem: STEM.json, STEM.md, STEM.png (default: "
                    "benchmarks/results/latency_cpu, or latency_gpu with --device cuda)")


def resolve_args(args):
    """Fill the device's defaults into `args` and refuse combinations that cannot mean what they say."""
    from benchmarks import gpu
    from exporters.triton_repo import DEFAULT_PROVIDERS

    cuda = args.device == "cuda"
    if args.batches is None:
        args.batches = gpu.DEFAULT_BATCHES if cuda else "1,16"
    if args.backends is None:
        args.backends = gpu.DEFAULT_BACKENDS if cuda else CPU_BACKENDS
    if args.providers is None:
        args.providers = DEFAULT_PROVIDERS["gpu" if cuda else "cpu"]
    if args.out is None:
        args.out = gpu.DEFAULT_OUT if cuda else "benchmarks/results/latency_cpu"
    if args.quick:
        args.batches, args.teacher_points = ("1,8" if cuda else "1"), "euler:2,heun:3"
        if args.concurrency == "1,4,16":
            args.concurrency = "1,4"
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    gpu_only = [b for b in backends if b in gpu.GPU_ONLY_BACKENDS]
    if gpu_only and not cuda:
        raise ValueError(f"backends {', '.join(gpu_only)} run on a GPU only: add --device cuda")
    providers = [p for p in args.providers.split(",") if p]
    if cuda and "CUDAExecutionProvider" not in providers:
        raise ValueError(f"--device cuda runs onnxruntime (in process and inside Triton) on the CUDA provider: "
                         f"--providers {args.providers} has no CUDAExecutionProvider")
    return args


def main_args(args) -> int:
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    resolve_args(args)
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(f"{out}.json", res)
    atomic_write_bytes(f"{out}.md", to_markdown(res).encode())
    plot(res, Path(f"{out}.png"))
    print(to_markdown(res))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return main_args(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

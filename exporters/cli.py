"""`onestep export {onnx,tensorrt,triton}` verbs."""

from __future__ import annotations

import argparse
import json


def cmd_onnx(args) -> int:
    from exporters.onnx_export import export_onnx

    names = None
    if args.class_names is not None:
        text = args.class_names
        if text.startswith("@"):  # a file: a JSON list, or one name per line
            from pathlib import Path

            text = Path(text[1:]).read_text()
            names = json.loads(text) if text.lstrip().startswith("[") else [x.strip() for x in text.splitlines()
                                                                            if x.strip()]
        else:
            names = [x.strip() for x in text.split(",")]
    side = export_onnx(args.model, args.out, graph=args.graph, precision=args.precision, opset=args.opset,
                       tolerance=args.tolerance, simplify=args.simplify, names=names)
    print(json.dumps({k: side[k] for k in ("file", "graph", "precision", "opset", "class_names", "parity",
                                           "export_seconds")}, indent=2))
    return 0


def cmd_tensorrt(args) -> int:
    from exporters.tensorrt_export import build_engine

    prof = tuple(int(x) for x in args.profile.split(","))
    side = build_engine(args.onnx, args.cache_dir, args.precision, prof, args.timing_cache)
    print(json.dumps({k: side.get(k) for k in ("path", "cache_hit", "precision", "profile", "parity",
                                               "build_seconds")}, indent=2))
    return 0


def cmd_triton(args) -> int:
    from benchmarks.quality import parse_points
    from exporters.triton_repo import build_repository

    preferred = tuple(int(x) for x in args.preferred_batch_sizes.split(",") if x.strip())
    man = build_repository(args.out, args.student, args.name, args.teacher,
                           tuple(parse_points(args.teacher_steps)), args.engine, args.max_batch,
                           args.max_queue_delay_us, args.instances, args.kind, args.providers, args.intra_op_threads,
                           preferred_batch_sizes=preferred, max_queue_size=args.max_queue_size,
                           queue_timeout_us=args.queue_timeout_us, response_cache=args.response_cache,
                           intra_op_spinning=args.intra_op_spinning)
    print(json.dumps({"repository": args.out, "models": list(man["models"])}, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX, TensorRT or a Triton model repository",
                       description="Export a checkpoint: `export onnx`, then `export tensorrt` (NVIDIA containers) "
                                   "and/or `export triton` to build a servable model repository.")
    ex = p.add_subparsers(dest="target", metavar="TARGET")
    ex.required = True

    o = ex.add_parser("onnx", help="checkpoint -> ONNX with measured parity and a JSON sidecar")
    o.add_argument("--model", required=True, help="student or teacher checkpoint (.safetensors)")
    o.add_argument("--out", required=True, help="output .onnx path (sidecar written as OUT.json)")
    o.add_argument("--graph", default="auto", choices=["auto", "generator", "denoiser"],
                   help="generator: (z[, labels]) -> image; denoiser: (x, sigma[, labels]) -> x0_hat "
                        "(labels only for class-conditional models)")
    o.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--tolerance", type=float, default=None, help="max abs error vs PyTorch (default 1e-4 fp32)")
    o.add_argument("--simplify", action="store_true", help="run onnxsim (pip install onnxsim)")
    o.add_argument("--class-names", default=None,
                   help="names of the classes, shown by the API and the web page: a comma list, or @FILE (a JSON "
                        "list or one name per line). Default: from the checkpoint's metadata (Fashion-MNIST "
                        "models get the dataset's names, others 'class k')")
    o.set_defaults(fn=cmd_onnx)

    t = ex.add_parser("tensorrt", help="ONNX -> TensorRT engine (needs TensorRT and a GPU)")
    t.add_argument("--onnx", required=True)
    t.add_argument("--cache-dir", default="artifacts/engines", help="engine cache folder")
    t.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    t.add_argument("--profile", default="1,16,64", help="min,opt,max batch")
    t.add_argument("--timing-cache", default=None)
    t.set_defaults(fn=cmd_tensorrt)

    from exporters import triton_repo as tr

    r = ex.add_parser("triton", help="ONNX/engine artifacts -> Triton model repository")
    r.add_argument("--out", required=True, help="repository folder")
    r.add_argument("--student", default=None, help="student ONNX (generator graph); an unconditional student "
                   "gives SEED -> IMAGE models (no LABEL input)")
    r.add_argument("--name", default="onestep", help="served name of the student")
    r.add_argument("--teacher", default=None, help="teacher ONNX (denoiser graph) for N-step baselines")
    r.add_argument("--teacher-steps", default="heun:18", help="sampler:steps list, e.g. euler:4,heun:18")
    r.add_argument("--engine", default=None, help="TensorRT engine (.plan) to add as <name>_trt")
    r.add_argument("--max-batch", type=int, default=64)
    r.add_argument("--max-queue-delay-us", type=int, default=tr.DEFAULT_MAX_QUEUE_DELAY_US,
                   help="dynamic batcher queue delay in microseconds (default %(default)s, chosen with python -m "
                        "benchmarks.queue_delay; see benchmarks/results/queue_delay.md)")
    r.add_argument("--preferred-batch-sizes", default=",".join(map(str, tr.DEFAULT_PREFERRED_BATCH_SIZES)),
                   help="comma list of preferred batch sizes, the maximum batch is always added "
                        "(default %(default)s; '' = only the maximum batch)")
    r.add_argument("--max-queue-size", type=int, default=tr.DEFAULT_MAX_QUEUE_SIZE,
                   help="requests the batcher queue holds; further requests are rejected at once (default 0 = "
                        "unbounded and no queue policy: on the bundled Triton any queue policy makes some requests "
                        "wait ~500 ms, see benchmarks/results/queue_policy.md)")
    r.add_argument("--queue-timeout-us", type=int, default=tr.DEFAULT_QUEUE_TIMEOUT_US,
                   help="requests queued longer are rejected (default 0 = never); clients may ask for less")
    r.add_argument("--instances", type=int, default=1)
    r.add_argument("--kind", default="cpu", choices=["cpu", "gpu"],
                   help="where the models run: cpu (KIND_CPU, onnxruntime's CPU provider) or gpu (KIND_GPU instance "
                        "groups; the python-backend models run onnxruntime-gpu's CUDA provider on the GPU Triton "
                        "gives each instance, and fail to load where it cannot run)")
    r.add_argument("--providers", default=None,
                   help="onnxruntime providers for the python-backend models (default: CPUExecutionProvider for "
                        "--kind cpu, CUDAExecutionProvider,CPUExecutionProvider for --kind gpu); must fit --kind")
    r.add_argument("--response-cache", default=True, action=argparse.BooleanOptionalAction,
                   help="enable Triton's response cache in the SEED[,LABEL] -> IMAGE models (default on; used by a "
                        "server started with a cache, e.g. `onestep serve --response-cache-mib N`)")
    r.add_argument("--intra-op-threads", type=int, default=0)
    r.add_argument("--intra-op-spinning", default=True, action=argparse.BooleanOptionalAction,
                   help="onnxruntime's intra-op threads busy-wait between operators (default on, onnxruntime's "
                        "default); --no-intra-op-spinning lets them sleep, leaving the cores to Triton and clients")
    r.set_defaults(fn=cmd_triton)

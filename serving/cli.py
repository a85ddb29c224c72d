"""`onestep serve` and `onestep generate` verbs (no torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_serve(args) -> int:
    import signal

    import uvicorn

    from serving.api import APISettings, create_app
    from serving.triton_server import TritonServer

    models = args.models.split(",") if args.models else None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: binding {args.host} without --api-key exposes the API to the network", file=sys.stderr)
    server = TritonServer(args.repo, models=models, ready_timeout=args.ready_timeout,
                          log_path=args.triton_log).start()
    print(f"Triton ready: http {server.http_url}, grpc {server.grpc_url} (log {server.log_path})", flush=True)
    try:
        settings = APISettings(triton_url=server.grpc_url, repository=args.repo, served=server.models,
                               max_images=args.max_images,
                               request_timeout_s=args.timeout, max_inflight=args.max_inflight,
                               api_key=args.api_key or os.environ.get("ONESTEP_API_KEY"))
        app = create_app(settings)
        print(f"API on http://{args.host}:{args.port}/ (OpenAPI at /docs)", flush=True)
        # uvicorn re-raises SIGTERM/SIGINT after its own shutdown: turn that into SystemExit so the finally
        # below stops Triton (it runs in its own session and would outlive us otherwise)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.stop()
    return 0


def cmd_generate(args) -> int:
    from onestep.noise import parse_seeds
    from serving.generate import clean_partial, run_job

    seeds = parse_seeds(args.seeds)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    formats = args.format.split(",")
    if args.onnx:
        from serving.engine import ImageEngine

        eng = ImageEngine(args.onnx, args.providers.split(","), args.sampler, args.steps, args.threads)
        gen, n_cls = eng.generate, eng.num_classes
        job = {"backend": "onnxruntime", "onnx_sha256": eng.meta["sha256"], "source_sha256": eng.meta.get("source_sha256"),
               "nfe": eng.nfe}
    elif args.triton:
        from serving.client import TritonImageClient

        if not args.model:
            raise ValueError("--triton needs --model NAME")
        cl = TritonImageClient(args.triton, args.protocol)
        cfg = cl.client.get_model_config(args.model, **({"as_json": True} if args.protocol == "grpc" else {}))
        cfg = cfg.get("config", cfg)
        n_cls = 1 if any(i["name"] == "LABEL" for i in cfg["input"]) else 0
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        n_cls = int(params.get("num_classes", n_cls))
        gen = lambda s, lab: cl.generate(args.model, s, lab)  # noqa: E731
        job = {"backend": "triton", "model": args.model, "onnx_sha256": params.get("onnx_sha256")}
    else:
        raise ValueError("give --onnx PATH (in-process) or --triton URL --model NAME")
    removed = clean_partial(args.out) if os.path.isdir(args.out) else 0
    res = run_job(args.out, seeds, gen, n_cls, job, args.label, args.shard_size, args.batch, formats, rank, world,
                  progress=not args.quiet)
    res["removed_partial"] = removed
    print(json.dumps(res))
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="start Triton (local or container) and the HTTP image API",
                       description="Start tritonserver on 127.0.0.1 with a model repository, wait until it is "
                                   "ready, and serve the HTTP image API beside it. Ctrl-C stops both.")
    p.add_argument("--repo", required=True, help="model repository made by `onestep export triton`")
    p.add_argument("--models", default=None, help="comma list of models to load (default: all this server can run)")
    p.add_argument("--host", default="127.0.0.1", help="API bind address (default localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key (X-API-Key); or set ONESTEP_API_KEY")
    p.add_argument("--max-images", type=int, default=64, help="images per request")
    p.add_argument("--max-inflight", type=int, default=32, help="concurrent generate requests before 429")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for Triton readiness")
    p.add_argument("--triton-log", default=None)
    p.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="offline batch generation into sharded .npz / PNG folders (resumable)",
                       description=__import__("serving.generate", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--seeds", required=True, help="e.g. 0-49999")
    g.add_argument("--out", required=True)
    g.add_argument("--onnx", default=None, help="student (or teacher denoiser) ONNX for in-process generation")
    g.add_argument("--sampler", default="heun", help="teacher ONNX only: euler | heun")
    g.add_argument("--steps", type=int, default=18, help="teacher ONNX only")
    g.add_argument("--providers", default="CPUExecutionProvider")
    g.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    g.add_argument("--triton", default=None, help="Triton URL (host:port) instead of --onnx")
    g.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    g.add_argument("--model", default=None, help="model name on Triton")
    g.add_argument("--label", type=int, default=None, help="one class for all images (default: seed mod classes); "
                   "an error for an unconditional model")
    g.add_argument("--shard-size", type=int, default=1000)
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--format", default="npz", help="npz, png or npz,png")
    g.add_argument("--rank", type=int, default=None)
    g.add_argument("--world-size", type=int, default=None)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(fn=cmd_generate)

"""`onestep serve` and `onestep generate` verbs (no torch)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def read_api_key(args) -> str | None:
    """The API key from $ONESTEP_API_KEY or the file named by --api-key-file / $ONESTEP_API_KEY_FILE (never
    from the command line, where `ps` shows it)."""
    path = args.api_key_file or os.environ.get("ONESTEP_API_KEY_FILE")
    if path:
        key = Path(path).read_text().strip()
        if not key:
            raise ValueError(f"API key file {path} is empty")
        return key
    return os.environ.get("ONESTEP_API_KEY") or None


def models_max_batch(repo: str | Path, models) -> int | None:
    """The smallest max_batch_size among the served models' config.pbtxt (None when unknown)."""
    sizes = []
    for m in models or []:
        cfg = Path(repo) / m / "config.pbtxt"
        if cfg.exists():
            hit = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", cfg.read_text(), re.M)
            if hit and int(hit.group(1)) > 0:
                sizes.append(int(hit.group(1)))
    return min(sizes) if sizes else None


def json_logging() -> None:
    """Access and event logs as JSON lines on stderr (the messages are JSON already)."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    for name in ("onestep.access", "onestep.api", "onestep.serve"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [h]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def cmd_serve(args) -> int:
    import signal
    import threading

    import uvicorn

    from serving.api import APISettings, create_app
    from serving.triton_server import TritonServer

    json_logging()
    events = logging.getLogger("onestep.serve")
    api_key = read_api_key(args)
    if args.host not in LOOPBACK and not api_key and not args.insecure:
        print(f"refusing to bind {args.host} without an API key: set ONESTEP_API_KEY (or --api-key-file), "
              f"or pass --insecure to serve the network without one", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not api_key:
        print(f"warning: --insecure: {args.host} serves anyone who can reach it", file=sys.stderr)
    models = args.models.split(",") if args.models else None
    if args.response_cache_mib < 0:
        print(f"--response-cache-mib must be >= 0, not {args.response_cache_mib}", file=sys.stderr)
        return 2
    server = TritonServer(args.repo, models=models, ready_timeout=args.ready_timeout, log_path=args.triton_log,
                          response_cache_bytes=args.response_cache_mib << 20)
    limit = models_max_batch(args.repo, server.models)
    if args.max_images is None:  # default: 64, or less when the models batch less
        args.max_images = min(64, limit) if limit is not None else 64
    elif limit is not None and args.max_images > limit:
        print(f"--max-images {args.max_images} exceeds the models' max_batch_size {limit}; use at most {limit}",
              file=sys.stderr)
        return 2
    server.start()
    print(f"Triton ready: http {server.http_url}, grpc {server.grpc_url}, metrics 127.0.0.1:{server.metrics_port} "
          f"(pid {server.proc.pid}, log {server.log_path}, response cache "
          f"{f'{args.response_cache_mib} MiB' if args.response_cache_mib else 'off'})", flush=True)
    exit_code = {"code": 0}
    try:
        settings = APISettings(triton_url=server.grpc_url, repository=args.repo, served=server.models,
                               max_images=args.max_images, request_timeout_s=args.timeout,
                               max_inflight=args.max_inflight, api_key=api_key,
                               triton_metrics_url=f"127.0.0.1:{server.metrics_port}",
                               triton_dead_after_s=args.triton_dead_after)
        app = create_app(settings)

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                # first SIGTERM/SIGINT: readiness 503 for --drain seconds (in-flight and new requests still
                # served), then uvicorn's own graceful shutdown waits for the requests in flight
                if getattr(self, "_draining", False) or args.drain <= 0:
                    return super().handle_exit(sig, frame)
                self._draining = True
                app.state.begin_stop()
                events.info(json.dumps({"event": "draining", "seconds": args.drain, "signal": int(sig)}))
                threading.Timer(args.drain, super().handle_exit, (sig, frame)).start()

        uv = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=max(1, int(args.timeout + 5))))

        def watch_triton():
            while not uv.should_exit:
                if not server.alive():
                    events.error(json.dumps({"event": "triton_exited", "code": server.proc.returncode}))
                    exit_code["code"] = 3
                    uv.should_exit = True
                    return
                time.sleep(0.5)

        threading.Thread(target=watch_triton, daemon=True, name="onestep-triton-exit").start()
        print(f"API on http://{args.host}:{args.port}/ (OpenAPI at /docs)", flush=True)
        # uvicorn re-raises SIGTERM/SIGINT after its own shutdown: turn that into SystemExit so the finally
        # below stops Triton (it runs in its own session and would outlive us otherwise)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        uv.run()
    finally:
        server.stop()
    if exit_code["code"]:
        print("tritonserver exited: stopping (exit code 3) so a supervisor restarts the service", file=sys.stderr)
    return exit_code["code"]


def cmd_generate(args) -> int:
    from onestep.noise import parse_seeds
    from serving.generate import run_job

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
    res = run_job(args.out, seeds, gen, n_cls, job, args.label, args.shard_size, args.batch, formats, rank, world,
                  progress=not args.quiet)
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
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key to require (X-API-Key); or set ONESTEP_API_KEY / "
                        "ONESTEP_API_KEY_FILE. A key is required to bind a non-loopback --host")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-images", type=int, default=None,
                   help="images per request (default 64 or the models' max_batch_size if smaller; a value above "
                        "max_batch_size is refused)")
    p.add_argument("--max-inflight", type=int, default=32, help="concurrent generate requests before 429")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for Triton readiness")
    p.add_argument("--triton-log", default=None)
    p.add_argument("--response-cache-mib", type=int, default=64,
                   help="size of Triton's local response cache in MiB (default %(default)s; 0 = off): a repeated "
                        "(model, seeds, labels) request to a model exported with the response cache on (the default "
                        "of `onestep export triton`) is answered from memory")
    p.add_argument("--drain", type=float, default=5.0,
                   help="seconds /readyz answers 503 after SIGTERM before the listener closes")
    p.add_argument("--triton-dead-after", type=float, default=30.0,
                   help="/healthz fails once Triton has been unreachable this long (s)")
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

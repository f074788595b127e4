"""`lightx2v serve`: start Ray locally (if needed) and the app, then block until Ctrl-C.

    lightx2v serve --model tiny-wan --host 127.0.0.1 --port 8765 --data-dir DIR

`serving/cli.py` (the `lightx2v` command) calls `add_serve_arguments` and `serve_main`; the demo
(`python -m serving.demo`) uses `start_service` directly.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from serving.cli import add_engine_arguments, default_dtype
from serving.config import AppArgs, import_object

APP_NAME = "lightx2v"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's flags (each maps to an `AppArgs` field or an HTTP option)."""
    parser.add_argument("--model", default="tiny-wan", help="registry name or local checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on all)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--data-dir", default="data", help="job store: SQLite database and videos")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_engine_arguments(parser)
    parser.add_argument("--max-pending-jobs", type=int, default=64,
                        help="queued + running jobs before POST /v1/videos answers 503")
    parser.add_argument("--replica-cpus", type=float, default=None,
                        help="CPUs per replica (default: 0 on cpu so the graph fits small machines, 1 on cuda)")
    parser.add_argument("--name", default=APP_NAME, help="Serve application name (for handles)")


def app_args_from(ns: argparse.Namespace) -> AppArgs:
    """`AppArgs` from the parsed flags (validated: bad values name the field)."""
    on_gpu = ns.device == "cuda"
    return AppArgs(
        model=ns.model, data_dir=os.path.abspath(ns.data_dir), device=ns.device,
        dtype=ns.dtype or default_dtype(ns.device), attention=ns.attention,
        quantization=ns.quantization, compile=ns.compile, offload=ns.offload, vae_tiling=ns.vae_tiling,
        cfg_batch=ns.cfg_batch,
        cfg_parallel=ns.cfg_parallel, ulysses_degree=ns.ulysses_degree,
        replica_cpus=ns.replica_cpus if ns.replica_cpus is not None else (1.0 if on_gpu else 0.0),
        ingress={"max_pending_jobs": ns.max_pending_jobs},
    )


@dataclass
class Service:
    url: str
    """Base URL of the HTTP API (the Videos API is under `url + "/v1"`)."""
    name: str
    handle: Any


def start_service(args: AppArgs, *, host: str = "127.0.0.1", port: int = 8000,
                  name: str = APP_NAME, log_to_driver: bool = True) -> Service:
    """Start Ray (locally, unless a cluster is already connected) and run the app."""
    import ray
    from ray import serve

    from serving.app import build_app

    if not ray.is_initialized():
        ray.init(namespace="lightx2v", include_dashboard=False, log_to_driver=log_to_driver,
                 num_cpus=max(2, os.cpu_count() or 2))
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(args), name=name, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Service(url=f"http://{shown}:{port}", name=name, handle=handle)


def free_port() -> int:
    """A TCP port free on this machine now (for local runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_service() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_main(ns: argparse.Namespace) -> int:
    """Run until Ctrl-C (or SIGTERM), then shut Serve and Ray down. Bad flags or an unknown
    model end with a one-line error (exit code 2) before Ray is started."""
    from stages.request import describe_error

    try:
        args = app_args_from(ns)
        import_object(args.engine_cls).resolve(args.model)
    except (ValueError, OSError) as err:  # pydantic's ValidationError is a ValueError
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2
    service = start_service(args, host=ns.host, port=ns.port, name=ns.name)
    print(f"lightx2v: serving {args.model} at {service.url} (data in {args.data_dir})", flush=True)
    print(f"  curl -s {service.url}/v1/videos -H 'content-type: application/json' "
          f"-d '{{\"prompt\": \"a cat surfing\", \"seconds\": 1}}'", flush=True)
    print(f"  curl -s {service.url}/v1/videos/VIDEO_ID ; curl -so out.mp4 {service.url}/v1/videos/VIDEO_ID/content",
          flush=True)
    print("Ctrl-C to stop.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("lightx2v: shutting down", flush=True)
    stop_service()
    return 0

"""`lightx2v serve`: start Ray locally (if needed) and the app, then block until Ctrl-C.

    lightx2v serve --model tiny-wan --host 127.0.0.1 --port 8765 --data-dir DIR

The `lightx2v` command (lightx2v/cli.py) derives the `serve` flags from `AppArgs` and calls
`serve_main`; this module never imports the CLI. The demo (`python -m serving.demo`) uses
`start_service` directly.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from engine.options import default_dtype
from serving.config import AppArgs, import_object

APP_NAME = "lightx2v"


def app_args_from(values: argparse.Namespace | Mapping[str, Any]) -> AppArgs:
    """`AppArgs` from `lightx2v serve`'s parsed flags (validated: bad values name the field).

    Every value named like an `AppArgs` field sets it; None (a flag not given) keeps the
    field's default, except where the default depends on the device: `dtype` (bfloat16 on cuda,
    float32 on cpu) and `replica_cpus` (1 on cuda, 0 on cpu so the graph fits small machines).
    `max_pending_jobs` sets `ingress.max_pending_jobs`; `data_dir` is made absolute."""
    given = {k: v for k, v in (vars(values) if isinstance(values, argparse.Namespace) else values).items()
             if v is not None}
    if isinstance(given.get("model"), list):  # `--model` repeats: one AppArgs per model (every_app_args)
        if len(given["model"]) != 1:
            raise ValueError(f"model: {len(given['model'])} models given; each has its own arguments "
                             "(serving.launch.every_app_args)")
        given["model"] = given["model"][0]
    args = {name: given[name] for name in AppArgs.model_fields if name in given}
    device = args.get("device", AppArgs.model_fields["device"].default)
    args.setdefault("dtype", default_dtype(device))
    args.setdefault("replica_cpus", 1.0 if device == "cuda" else 0.0)
    args["data_dir"] = os.path.abspath(args.get("data_dir", AppArgs.model_fields["data_dir"].default))
    if "max_pending_jobs" in given:
        args["ingress"] = {**args.get("ingress", {}), "max_pending_jobs": given["max_pending_jobs"]}
    return AppArgs(**args)


def every_app_args(values: argparse.Namespace | Mapping[str, Any]) -> list[AppArgs]:
    """One `AppArgs` per `--model` given (`lightx2v serve --model A --model B`: the same flags for
    every model), or the default model's."""
    given = dict(vars(values) if isinstance(values, argparse.Namespace) else values)
    models = given.get("model")
    models = models if isinstance(models, list) else [models]
    return [app_args_from({**given, "model": model}) for model in models]


@dataclass
class Service:
    url: str
    """Base URL of the HTTP API (the Videos API is under `url + "/v1"`)."""
    name: str
    handle: Any


def start_service(args: AppArgs | list[AppArgs], *, host: str = "127.0.0.1", port: int = 8000,
                  name: str = APP_NAME, log_to_driver: bool = True, service: Any = None) -> Service:
    """Start Ray (locally, unless a cluster is already connected) and run the app (several
    models: `args` a list, one HTTP entrance routing on `model`: serving/router.py). `service`:
    the service settings (`serving.settings.ServiceSettings` or a dict; None = defaults)."""
    import ray
    from ray import serve

    from serving.router import build_multi_app

    if not ray.is_initialized():
        ray.init(namespace="lightx2v", include_dashboard=False, log_to_driver=log_to_driver,
                 num_cpus=max(2, os.cpu_count() or 2))
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_multi_app(args if isinstance(args, list) else [args], service=service),
                       name=name, route_prefix="/")
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

    from serving.settings import ServiceSettings

    try:
        every = every_app_args(ns)  # --model A --model B: one app args each
        settings = ServiceSettings.from_flags(ns)  # --api-key, --cors-origins, limits
        settings.load_api_keys()
        for args in every:
            import_object(args.engine_cls).resolve(args.model)
    except (ValueError, OSError) as err:  # pydantic's ValidationError is a ValueError
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2
    args = every[0]
    service = start_service(every, host=ns.host, port=ns.port, name=ns.name, service=settings)
    print(f"lightx2v: serving {', '.join(a.model for a in every)} at {service.url} (data in {args.data_dir})",
          flush=True)
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

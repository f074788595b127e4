"""`build_app(args) -> Application`: the deployment graph, as serve_config.yaml names it
(`import_path: serving.app:build_app`).

    Ingress ──> TextEncoder, ImageEncoder (I2V models only), DiTGroup, VAEDecoder

Arguments are validated by `AppArgs` (serving/config.py); every deployment option comes from
`deployment_options(args)` there. The service's own settings (API keys, CORS, body limits, the
number of ingress replicas: `serving.settings.ServiceSettings`) come as the `service:` mapping
of the arguments or the `service=` argument. The classes are plain (serving/deployments.py,
serving/ingress.py) and become deployments here, not by decorators at import time.
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serving.config import AppArgs, deployment_options, import_object
from serving.settings import ServiceSettings
from serving.deployments import DiTGroup, ImageEncoder, TextEncoder, VAEDecoder
from serving.ingress import Ingress

__all__ = ["AppArgs", "build_app", "deployment_options"]


def build_app(args: dict[str, Any] | AppArgs,
              service: ServiceSettings | dict[str, Any] | None = None) -> Application:
    """The app for `args` (a dict as in serve_config.yaml, or `AppArgs`) and the service
    settings (`service`, or the `service:` entry of the dict)."""
    if isinstance(args, dict) and "service" in args:
        args = dict(args)
        entry = args.pop("service")
        service = entry if service is None else service
    app_args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    settings = ServiceSettings.from_value(service)
    settings.load_api_keys()  # a bad key or an unreadable keys file fails here, not in a replica
    options = deployment_options(app_args)
    options["Ingress"]["num_replicas"] = settings.ingress_replicas
    plain = app_args.model_dump(mode="json")  # replicas get a plain dict, validated again there

    def deployment(cls: type, name: str):
        return serve.deployment(cls, name=name).options(**options[name])

    spec = import_object(app_args.engine_cls).resolve(app_args.model)
    text = deployment(TextEncoder, "TextEncoder").bind(plain)
    image = deployment(ImageEncoder, "ImageEncoder").bind(plain) if spec.tasks & {"i2v", "edit"} else None
    dit = deployment(DiTGroup, "DiTGroup").bind(plain)
    decoder = deployment(VAEDecoder, "VAEDecoder").bind(plain)
    ingress_cls = serve.ingress()(Ingress)  # the FastAPI app is built per replica
    return deployment(ingress_cls, "Ingress").bind(plain, text, image, dit, decoder, settings.to_dict())

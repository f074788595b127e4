"""Several models behind one service: one HTTP entrance that routes on the request's `model`.

    lightx2v serve --model tiny-qwen-image --model tiny-qwen-image-edit --model tiny-wan

    Router (HTTP: Videos API, Images API, /v1/models listing every model)
      ├─ model A: Ingress (handles only) ─> its TextEncoder, [ImageEncoder], DiTGroup, VAEDecoder
      └─ model B: Ingress (handles only) ─> its own stage deployments ...

Each model keeps its whole graph (`serving.app.build_app`'s deployments, named `<i>-<model>-<stage>`
inside the one application) and its own jobs; every model's ingress writes the one job store in
the shared `data_dir`, which the router reads for status, listing and content (so one job id
space, one admission bound). Creating calls go to the model named by `model` (its registry name,
alias or the name it was served under); without one, to the only model that can do the call
(the only video model for /v1/videos; for the Images API the only image model of that task), else
a 400 listing the choices. DELETE goes to the job's model. The router builds the same HTTP app
as a one-model service (`serving.ingress.build_http_app`: errors, limits, CORS, API keys) plus the
Images API routes (`serving.images_api.add_image_routes`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from engine.registry import ModelSpec
from serving.api import ApiError
from serving.app import build_app
from serving.auth import ApiKeys
from serving.config import AppArgs, deployment_options, import_object
from serving.deployments import DiTGroup, ImageEncoder, TextEncoder, VAEDecoder
from serving.ingress import Ingress, build_http_app
from serving.jobstore import SQLiteJobStore
from serving.settings import ServiceSettings


@dataclass(frozen=True)
class Route:
    spec: ModelSpec
    names: tuple[str, ...]
    """What a request's `model` may say (case-insensitive): the registry name, its aliases and
    the name it was served under."""
    handle: DeploymentHandle


class Router:
    """The HTTP entrance of a several-model service (see the module docstring). It has the
    methods `build_http_app` and `add_image_routes` call on an `Ingress`."""

    busy_retries = 0

    def __init__(self, models: list[dict[str, Any]], ingresses: list[DeploymentHandle],
                 service: dict[str, Any] | ServiceSettings | None = None) -> None:
        self.settings = ServiceSettings.from_value(service)
        self.keys = ApiKeys(self.settings.load_api_keys())
        self.routes: list[Route] = []
        for raw, handle in zip(models, ingresses):
            args = AppArgs.model_validate(raw)
            spec = import_object(args.engine_cls).resolve(args.model)
            self.routes.append(Route(spec, tuple(dict.fromkeys((spec.name, args.model, *spec.aliases))), handle))
        self.specs = [route.spec for route in self.routes]
        self.spec = self.specs[0]
        self.store = SQLiteJobStore(AppArgs.model_validate(models[0]).data_dir)
        self._tasks: dict[str, Any] = {}  # jobs run in the models' ingresses, none here

    # -- routing ---------------------------------------------------------------------------------
    def _route(self, fields: dict[str, Any], what: str, fits) -> Route:
        """The model a creating call goes to: the one `model` names, else the only one that fits."""
        model = fields.get("model")
        if model is not None:
            wanted = str(model).casefold()
            for route in self.routes:
                if wanted in (n.casefold() for n in route.names):
                    return route
            raise ApiError(400, f"model {model!r} is not served here; models: "
                                f"{', '.join(r.spec.name for r in self.routes)}", param="model")
        fitting = [r for r in self.routes if fits(r.spec)]
        if len(fitting) == 1:
            return fitting[0]
        raise ApiError(400, f"model is required: this service runs {', '.join(r.spec.name for r in self.routes)}"
                            f"{'' if fitting else f' and none of them does {what}'}", param="model")

    @staticmethod
    async def _call(response) -> Any:
        """Await a model ingress's answer; its ApiError (4xx/5xx for the client) passes through."""
        try:
            return await response
        except RayTaskError as err:
            if isinstance(err.cause, ApiError):
                raise err.cause from None
            raise

    # -- the Ingress methods the HTTP routes call --------------------------------------------------
    async def submit(self, fields: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        route = self._route(fields, "videos", lambda s: s.modality == "video")
        return await self._call(route.handle.submit.remote({**fields, "model": route.spec.name}, owner))

    async def images(self, fields: dict[str, Any], owner: str | None = None, edit: bool = False,
                     base_url: str = "") -> dict[str, Any]:
        task = "edit" if edit else "t2i"
        route = self._route(fields, "image edits" if edit else "text-to-image",
                            lambda s: s.modality == "image" and task in s.tasks)
        return await self._call(route.handle.images.remote({**fields, "model": route.spec.name}, owner,
                                                           edit=edit, base_url=base_url))

    async def delete(self, video_id: str, owner: str | None = None) -> dict[str, Any]:
        job = self._get(video_id, owner)
        route = next((r for r in self.routes if r.spec.name == job.model), None)
        if route is None:  # a job of a model no longer served: only its record and file remain
            self.store.delete(video_id)
            return {"id": video_id, "object": "video.deleted", "deleted": True}
        return await self._call(route.handle.delete.remote(video_id, owner))

    # reading the shared store: the same code as a one-model ingress
    _get = Ingress._get
    status = Ingress.status
    list_videos = Ingress.list_videos

    def __serve_build_asgi_app__(self) -> FastAPI:
        from serving.images_api import add_image_routes

        app = build_http_app(self)
        add_image_routes(app, self)
        return app


def _deployment_name(index: int, spec: ModelSpec, stage: str) -> str:
    return f"{index}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec.name)}-{stage}"


def build_multi_app(models: list[dict[str, Any] | AppArgs],
                    service: ServiceSettings | dict[str, Any] | None = None) -> Application:
    """One application serving every model of `models` (each `build_app`'s arguments; one model:
    `build_app` itself). All must share one `data_dir` (the one job store)."""
    if len(models) == 1:
        return build_app(models[0], service)
    args = [m if isinstance(m, AppArgs) else AppArgs.model_validate(m) for m in models]
    data_dirs = {a.data_dir for a in args}
    if len(data_dirs) > 1:
        raise ValueError(f"data_dir: the models of one service share one job store; got {sorted(data_dirs)}")
    settings = ServiceSettings.from_value(service)
    settings.load_api_keys()
    plain_settings = settings.to_dict()
    ingresses, plains = [], []
    for i, app_args in enumerate(args):
        spec = import_object(app_args.engine_cls).resolve(app_args.model)
        options = deployment_options(app_args)
        plain = app_args.model_dump(mode="json")

        def deployment(cls: type, stage: str, i=i, spec=spec, options=options):
            return serve.deployment(cls, name=_deployment_name(i, spec, stage)).options(**options[stage])

        text = deployment(TextEncoder, "TextEncoder").bind(plain)
        image = deployment(ImageEncoder, "ImageEncoder").bind(plain) if spec.tasks & {"i2v", "edit"} else None
        dit = deployment(DiTGroup, "DiTGroup").bind(plain)
        decoder = deployment(VAEDecoder, "VAEDecoder").bind(plain)
        ingresses.append(deployment(Ingress, "Ingress").bind(plain, text, image, dit, decoder, plain_settings))
        plains.append(plain)
    router_options = dict(deployment_options(args[0])["Ingress"], num_replicas=settings.ingress_replicas)
    router = serve.deployment(serve.ingress()(Router), name="Router").options(**router_options)
    return router.bind(plains, ingresses, plain_settings)


def build_service(args: dict[str, Any]) -> Application:
    """serve_config.yaml's builder for several models (`import_path: serving.router:build_service`):
    `args: {models: [{model: A, data_dir: ..., ...}, {model: B, ...}], service: {...}}`, each
    entry `build_app`'s arguments."""
    if not isinstance(args.get("models"), list) or not args["models"]:
        raise ValueError("models: a non-empty list of app arguments ({model: ..., data_dir: ...}) is required")
    unknown = sorted(set(args) - {"models", "service"})
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; build_service takes models and service")
    return build_multi_app(args["models"], args.get("service"))

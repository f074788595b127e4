"""The app's arguments (`AppArgs`, pydantic) and every deployment option computed from them.

`deployment_options(args)` is the one place where replicas, autoscaling, GPUs (fractions for the
encoders/decoder, a placement group for the DiT group), `max_ongoing_requests` and
`max_queued_requests` are decided. `serve_config.yaml` may still override a deployment's
options in its `deployments:` list (Ray Serve's own mechanism); the builder itself never
branches elsewhere.

The engine options of `AppArgs` (`EngineArgs`) are derived from `EngineOptions`
(engine/options.py): names (flat: `cfg_parallel`, `ulysses_degree`), types, defaults and
descriptions; a new option is a new argument with no edit here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from engine.options import EngineOptions, OptionField, option_fields, options_from_flat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- engine options

SERVE_DEVICE_DOC = ('"cuda" asks Ray for GPUs (fractions per stage, a placement group for the DiT group); '
                    '"cpu" asks for none (tests, demo).')


def _serve_option(f: OptionField) -> OptionField:
    """The one serve-config difference: the device is "cpu" or "cuda" (Ray places the GPUs)."""
    if f.name == "device":
        return dataclasses.replace(f, annotation=Literal["cpu", "cuda"], doc=SERVE_DEVICE_DOC)
    return f


ENGINE_FIELDS: tuple[OptionField, ...] = tuple(_serve_option(f) for f in option_fields(EngineOptions))
"""The engine options as flat serve-config arguments (`cfg_parallel` for parallel.cfg), derived
from `EngineOptions`: name, type, default and description come from its declarations."""


def _check_option(cls, value: Any, info) -> Any:
    options_from_flat(EngineOptions, {info.field_name: value})  # the option's own check, named by the field
    return value


EngineArgs = create_model(
    "EngineArgs", __base__=_Strict, __doc__="The engine options of `AppArgs` (frozen at start-up).",
    __validators__={"_check_option": field_validator(*(f.name for f in ENGINE_FIELDS))(_check_option)},
    **{f.name: (f.annotation, Field(f.default, description=f.doc or None)) for f in ENGINE_FIELDS})


class _ScalingArgs(_Strict):
    """Replicas of one deployment: a fixed count, or autoscaling between two bounds."""

    num_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Fixed replica count (>= 1), or "auto" to autoscale between min_replicas and max_replicas."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    """Autoscaling target: requests in flight per replica."""


class StageArgs(_ScalingArgs):
    """Scaling and resources of one stage deployment (text encoder, image encoder, VAE decoder)."""

    num_gpus: float = Field(0.0, ge=0)
    """GPU (fraction) per replica when the app runs on GPUs; ignored on CPU."""
    num_cpus: float | None = Field(None, ge=0)
    """CPUs per replica; None = AppArgs.replica_cpus."""
    max_ongoing_requests: int = Field(4, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    """Callers beyond this wait nowhere: they get BackPressureError (-1 = unbounded)."""


class DiTArgs(_ScalingArgs):
    """The DiT group deployment: replicas, and the GPUs of its worker group."""

    target_ongoing_requests: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    """GPU (fraction) of each worker actor when the app runs on GPUs (one worker per rank)."""
    num_cpus: float | None = Field(None, ge=0)
    """CPUs of the replica actor itself (bundle 0 of its placement group)."""
    max_ongoing_requests: int = Field(2, ge=1)
    """Jobs handed to one replica at once: one denoising, one waiting with its inputs ready."""
    max_queued_requests: int = Field(32, ge=-1)
    graceful_shutdown_timeout_s: float = Field(600.0, gt=0)
    """Longer than the longest job, so a downscale does not cut one off."""
    health_check_period_s: float = Field(10.0, gt=0)
    """How often Serve calls `check_health` (a dead rank fails it; the replica is replaced)."""
    health_check_timeout_s: float = Field(60.0, gt=0)
    progress_poll_s: float = Field(0.25, gt=0)
    """How often the replica asks rank 0 for the step count while a job denoises."""


class IngressArgs(_Strict):
    max_pending_jobs: int = Field(64, ge=1)
    """Jobs queued or running in the ingress at once; beyond it POST /v1/videos answers 503."""
    retry_after_s: int = Field(5, ge=1)
    """The Retry-After value sent with 503."""
    busy_timeout_s: float = Field(600.0, gt=0)
    """How long a job keeps retrying a stage whose queue is full before it fails."""
    max_ongoing_requests: int = Field(512, ge=1)
    """HTTP/handle calls in the ingress at once (each is short, except `generate`)."""
    max_queued_requests: int = Field(1024, ge=-1)
    num_cpus: float | None = Field(None, ge=0)


class AppArgs(EngineArgs):
    """Everything `build_app` takes (the `args:` of serve_config.yaml, or `lightx2v serve` flags):
    the engine options (`EngineArgs`, derived from `EngineOptions`), then the fields below."""

    model: str = "tiny-wan"
    """A local checkpoint directory, a registry name or alias, or a Hugging Face hub id: resolved at
    start-up as the library resolves it ($LIGHTX2V_MODEL_ROOT, the Hugging Face cache; `lightx2v
    serve --download` fetches it first), never per request."""
    data_dir: str = "data"
    """Job store: SQLite database and the finished videos. Give an absolute path: a relative one
    is taken from the ingress replica's working directory (`lightx2v serve` makes it absolute)."""
    # -- deployments --
    text_encoder: StageArgs = StageArgs()
    image_encoder: StageArgs = StageArgs()
    decoder: StageArgs = StageArgs()
    dit: DiTArgs = DiTArgs()
    ingress: IngressArgs = IngressArgs()
    replica_cpus: float = Field(1.0, ge=0)
    """Default CPUs per replica (tests use 0 so the graph fits on 2 cores)."""
    # -- injectable implementations ("module:Name") --
    engine_cls: str = "serving.engines:WanStageEngine"
    """Builds the stage objects inside each replica (tests inject fakes)."""
    dit_worker_cls: str = "cluster:DiTWorker"
    """The worker class of the DiT group (one per rank)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for engine_cls (fakes take delays here)."""
    dit_worker_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for dit_worker_cls's constructor (on every rank)."""

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        for name in ("text_encoder", "image_encoder", "decoder", "dit"):
            stage = getattr(self, name)
            if stage.min_replicas > stage.max_replicas:
                raise ValueError(f"{name}.min_replicas ({stage.min_replicas}) must be <= "
                                 f"{name}.max_replicas ({stage.max_replicas})")
        if self.device == "cpu" and self.dtype != "float32":
            raise ValueError(f"dtype must be 'float32' when device is 'cpu', got {self.dtype!r}")
        self.engine_options()  # raises on bad combinations, naming the field
        return self

    @property
    def use_gpus(self) -> bool:
        return self.device == "cuda"

    @property
    def world_size(self) -> int:
        return self.engine_options().parallel.world_size

    def engine_options(self) -> EngineOptions:
        """The frozen engine options every stage and DiT worker is built with."""
        return options_from_flat(EngineOptions, {f.name: getattr(self, f.name) for f in ENGINE_FIELDS})


def import_object(path: str) -> Any:
    """`"package.module:Name"` -> the object (used for the injectable classes)."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'module:Name', got {path!r}")
    return getattr(importlib.import_module(module), name)


def _scaling(stage: StageArgs | DiTArgs) -> dict[str, Any]:
    if stage.num_replicas == "auto":
        return {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": stage.min_replicas, "max_replicas": stage.max_replicas,
            "target_ongoing_requests": stage.target_ongoing_requests}}
    return {"num_replicas": stage.num_replicas}


def deployment_options(args: AppArgs) -> dict[str, dict[str, Any]]:
    """Ray Serve options of every deployment, from the app's arguments (the one place)."""
    gpu = args.use_gpus

    def cpus(value: float | None) -> float:
        return args.replica_cpus if value is None else value

    def stage(s: StageArgs) -> dict[str, Any]:
        return {**_scaling(s),
                "ray_actor_options": {"num_cpus": cpus(s.num_cpus), "num_gpus": s.num_gpus if gpu else 0},
                "max_ongoing_requests": s.max_ongoing_requests,
                "max_queued_requests": s.max_queued_requests}

    dit = args.dit
    dit_options: dict[str, Any] = {
        **_scaling(dit),
        # The replica drives the worker actors and never touches CUDA itself.
        "ray_actor_options": {"num_cpus": cpus(dit.num_cpus), "num_gpus": 0},
        "max_ongoing_requests": dit.max_ongoing_requests,
        "max_queued_requests": dit.max_queued_requests,
        "graceful_shutdown_timeout_s": dit.graceful_shutdown_timeout_s,
        "health_check_period_s": dit.health_check_period_s,
        "health_check_timeout_s": dit.health_check_timeout_s,
    }
    if gpu:
        # Bundle 0 holds the replica actor; one GPU bundle per rank, all on one node.
        dit_options["placement_group_bundles"] = (
            [{"CPU": max(cpus(dit.num_cpus), 1.0)}]
            + [{"GPU": dit.gpus_per_worker, "CPU": 1.0}] * args.world_size)
        dit_options["placement_group_strategy"] = "STRICT_PACK"
        dit_options["ray_actor_options"]["num_cpus"] = max(cpus(dit.num_cpus), 1.0)

    ing = args.ingress
    options = {
        "TextEncoder": stage(args.text_encoder),
        "ImageEncoder": stage(args.image_encoder),
        "DiTGroup": dit_options,
        "VAEDecoder": stage(args.decoder),
        "Ingress": {"num_replicas": 1,  # one: it owns the SQLite job store and the job tasks
                    "ray_actor_options": {"num_cpus": cpus(ing.num_cpus), "num_gpus": 0},
                    "max_ongoing_requests": ing.max_ongoing_requests,
                    "max_queued_requests": ing.max_queued_requests},
    }
    # Where Serve itself turns a full queue into an HTTP answer (the proxy in front of a full
    # ingress): 503 with Retry-After, like the ingress's own pending-job bound.
    for o in options.values():
        o["backpressure_config"] = {"status_code": 503, "retry_after_s": ing.retry_after_s}
    return options

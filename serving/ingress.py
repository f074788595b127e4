"""The ingress: HTTP (OpenAI-compatible Videos API) and handle methods, jobs, the job store.

A job is an asyncio task in one ingress replica that chains the stage deployments in the order of
the request's stage plan (stages/plan.py, the same plan `LocalPipeline` follows; see
serving/deployments.py for how progress and latents flow):

    TextEncoder.encode ──┐ (DeploymentResponses passed on, not awaited here)
    ImageEncoder.encode ─┴─> DiTGroup.denoise (stream: progress events, then a LatentsRef)
                                  └─> VAEDecoder.decode(LatentsRef) -> MP4 bytes -> job store

Only the image encoder receives the request's image (already shrunk to what the model can use,
`serving.api.fit_image`); the other stages get the request without it.

Job status: `queued` until the DiT group takes the job, `in_progress` while it denoises
(progress 0..95 with the steps) and decodes, then `completed` (progress 100) or `failed`.
Admission: at most `ingress.max_pending_jobs` queued+running jobs (all replicas, counted in the
store), beyond that 503 with Retry-After. A stage whose own queue is full (`BackPressureError`,
from `max_queued_requests`) makes the job wait and retry (it stays `queued`) for up to
`ingress.busy_timeout_s`, then fail with code `server_busy`. So does a DiT replica whose worker
group failed and that waits to be replaced (`DiTGroupUnavailable`: the job had not started there).

Several ingress replicas (`ServiceSettings.ingress_replicas`) share the job store, so the API
keeps answering while one is replaced. Each replica is a *runner*: it heartbeats in the store
every `MAINTAIN_S`, cancels its jobs that were deleted through another replica, and fails the
jobs of runners that stopped heartbeating (`job_lease_s`). The DiT group is given the replica's
actor handle with each job and stops a job whose replica died (no orphaned denoising).

HTTP hardening (docs/SERVING.md): API keys and job owners (`serving.auth`), body limits before
reading (`serving.limits`), every answer an OpenAI-shaped error with no internal details, text
that is not valid Unicode refused, JSON nesting refused instead of crashing, CORS only for the
configured origins, metrics (`serving.metrics`).
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import random
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics
from serving.api import (OPENAI_FIELDS, OUR_FIELDS, ApiError, OpenAIJSONResponse, build_request,
                         format_seconds, model_object, public_message, request_params, video_object,
                         without_image)
from serving.auth import ApiKeys, check_origin
from serving.config import AppArgs, import_object
from serving.deployments import DenoiseProgress, DiTGroupUnavailable, LatentsRef, lora_set_id
from serving.jobstore import JobNotFound, JobRecord, SQLiteJobStore, new_job_id
from serving.limits import MULTIPART_OVERHEAD, BodyLimit
from serving.settings import ServiceSettings
from stages.plan import plan_for
from stages.request import GenerationRequest, ResolvedRequest

log = logging.getLogger("ray.serve")

T = TypeVar("T")

DENOISE_SHARE = 95
"""Progress points given to denoising; the decode takes the job to 100."""
LIST_LIMIT_MAX = 100
MAINTAIN_S = 1.0
"""How often a replica heartbeats, looks for its jobs deleted elsewhere, updates its gauges."""
MAX_FORM_FIELDS = 32


class Ingress:
    """FastAPI ingress + handle API. `text`, `image` (None for T2V-only models), `dit` and
    `decoder` are the handles of the stage deployments (bound in `serving.app.build_app`);
    `service` the `ServiceSettings` (a dict from the app builder)."""

    def __init__(self, args: dict[str, Any], text: DeploymentHandle, image: DeploymentHandle | None,
                 dit: DeploymentHandle, decoder: DeploymentHandle,
                 service: dict[str, Any] | ServiceSettings | None = None) -> None:
        self.args = AppArgs.model_validate(args)
        self.settings = ServiceSettings.from_value(service)
        self.keys = ApiKeys(self.settings.load_api_keys())
        self.spec = import_object(self.args.engine_cls).resolve(self.args.model)
        self.served_names = tuple(dict.fromkeys((self.spec.name, self.args.model)))
        self.store = SQLiteJobStore(self.args.data_dir)
        self.runner = f"ingress-{uuid.uuid4().hex[:12]}"
        self.store.heartbeat(self.runner)
        interrupted = self.store.fail_orphaned(self.settings.job_lease_s)
        if interrupted:
            log.warning("marked %d interrupted jobs failed: %s", len(interrupted), interrupted)
        self._text, self._image, self._dit, self._decoder = text, image, dit, decoder
        self._caller = _own_actor_handle()
        self._tasks: dict[str, asyncio.Task] = {}
        self._states: dict[str, str] = {}
        self._maintainer: asyncio.Task | None = None
        self._last_sweep = time.monotonic()
        self.busy_retries = 0
        """How often a job found a stage queue full and retried (exposed on /health)."""
        self._ensure_maintainer()

    # ------------------------------------------------------------------ handle API (and HTTP)
    async def submit(self, request: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """Validate, create a job (owned by `owner`), start it; returns the video object at once."""
        self._ensure_maintainer()
        if self.spec.modality != "video":
            raise ApiError(400, f"model {self.spec.name!r} makes images: use POST /v1/images/generations "
                                "(or /v1/images/edits), not /v1/videos", param="model")
        resolved = build_request(dict(request), self.spec, self.served_names,
                                 max_image_pixels=self.settings.max_image_pixels)
        self.check_admission()
        return video_object(self.start_job(resolved, owner))

    def check_admission(self, jobs: int = 1) -> None:
        """503 with Retry-After when `jobs` more would exceed `ingress.max_pending_jobs`."""
        pending = self.store.count_active()
        if pending + jobs > self.args.ingress.max_pending_jobs:
            raise ApiError(503, f"too many pending jobs ({pending}); retry later",
                           headers={"Retry-After": str(self.args.ingress.retry_after_s)})

    def start_job(self, resolved: ResolvedRequest, owner: str | None = None) -> JobRecord:
        """Create the job of a validated request in the store and start it (Videos API: one per
        request; Images API: one per image)."""
        job = self.store.create(JobRecord(
            id=new_job_id("image" if self.spec.modality == "image" else "video"),
            created_at=int(time.time()), status="queued", model=self.spec.name,
            prompt=resolved.prompt, size=f"{resolved.width}x{resolved.height}",
            seconds=format_seconds(resolved.kept_frames, resolved.fps),
            params=request_params(resolved), owner=owner, runner=self.runner))
        metrics.inc("lightx2v_jobs_submitted_total", model=self.spec.name)
        # A fresh context: the job must not be tied to (and cancelled with) the HTTP request.
        task = asyncio.get_running_loop().create_task(
            self._run_job(job.id, resolved), context=contextvars.Context())
        self._tasks[job.id] = task
        self._set_state(job.id, "queued")
        task.add_done_callback(lambda _t, job_id=job.id: self._forget(job_id))
        return job

    async def images(self, fields: dict[str, Any], owner: str | None = None, edit: bool = False,
                     base_url: str = "") -> dict[str, Any]:
        """The Images API (serving/images_api.py): `n` image jobs, awaited; OpenAI's images
        response (b64_json, or URLs under `base_url`)."""
        from serving.images_api import run_images

        self._ensure_maintainer()
        return await run_images(self, fields, owner, edit=edit, base_url=base_url)

    async def status(self, video_id: str, owner: str | None = None) -> dict[str, Any]:
        return video_object(self._get(video_id, owner))

    async def generate(self, request: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """Submit and wait for the finished video: the video object plus `video_bytes` (MP4)
        and `path` (the file in the data dir, for callers on the same machine)."""
        video = await self.submit(request, owner)
        task = self._tasks.get(video["id"])
        if task is not None:
            await asyncio.wait([task])  # not cancelled with the caller; a DELETE ends it
        job = self._get(video["id"], owner)
        out = video_object(job)
        path = self.store.result_path(job.id) if job.status == "completed" else None
        if path is not None:
            out["video_bytes"] = path.read_bytes()
            out["path"] = str(path)
        return out

    async def delete(self, video_id: str, owner: str | None = None) -> dict[str, Any]:
        """Cancel a queued or running job (its DiT work stops at the next step), or delete a
        finished one with its file. A job running in another replica is cancelled by that
        replica within `MAINTAIN_S` of its record going."""
        self._get(video_id, owner)  # 404 for unknown ids and other owners' jobs
        task = self._tasks.get(video_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=60)
        self.store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def list_videos(self, limit: int = 20, after: str | None = None, order: str = "desc",
                    owner: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ApiError(400, f"limit must be in 1..{LIST_LIMIT_MAX}, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        try:
            jobs, has_more = self.store.list(limit=limit, after=after, order=order, owner=owner)
        except JobNotFound:  # the `after` cursor names no job (of this owner)
            raise ApiError(404, f"no video with id {after!r}", param="after") from None
        data = [video_object(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    def replica_info(self) -> dict[str, Any]:
        """This replica's runner id and process id (handle only, for operators and tests)."""
        return {"runner": self.runner, "pid": os.getpid(), "jobs": sorted(self._tasks)}

    def _get(self, video_id: str, owner: str | None = None, param: str = "video_id") -> JobRecord:
        try:
            return self.store.get(video_id, owner=owner)
        except JobNotFound:
            raise ApiError(404, f"no video with id {video_id!r}", param=param) from None

    # ------------------------------------------------------------------ the job
    async def _run_job(self, job_id: str, request: ResolvedRequest) -> None:
        start = time.monotonic()
        status, reason = "cancelled", "deleted"
        try:
            # 1. Encoders + DiT group -> a reference to the latents.
            latents = await self._retry_busy(job_id, lambda: self._denoise(job_id, request))
            # 2. Decode (the decoder fetches the latents itself) and store the result.
            result = await self._retry_busy(
                job_id, lambda: self._decoder.decode.remote(without_image(request), latents))
            self.store.save_result(job_id, result.data, getattr(result, "mime_type", "video/mp4"))
            self.store.set_status(job_id, "completed", progress=100)
            status, reason = "completed", ""
        except asyncio.CancelledError:
            log.info("job %s cancelled", job_id)
            raise
        except BackPressureError:
            status, reason = "failed", "server_busy"
            self.store.set_status(job_id, "failed", error_code="server_busy",
                                  error_message=f"stage queues stayed full for "
                                                f"{self.args.ingress.busy_timeout_s:.0f} s")
        except Exception as err:  # noqa: BLE001 - any failure ends the job with its message
            log.exception("job %s failed", job_id)
            status, reason = "failed", "generation_failed"
            self.store.set_status(job_id, "failed", error_code="generation_failed",
                                  error_message=_error_message(err))
        finally:
            metrics.inc("lightx2v_jobs_finished_total", model=self.spec.name, status=status, reason=reason)
            metrics.observe("lightx2v_job_seconds", time.monotonic() - start, model=self.spec.name,
                            status=status)

    async def _denoise(self, job_id: str, request: ResolvedRequest) -> LatentsRef:
        # Encoder responses are passed on unawaited: Serve resolves them object store to object
        # store before the DiT call is assigned to a replica. Only the image encoder gets the image.
        plain = without_image(request)
        text = self._text.encode.remote(request if self.spec.text_reads_images else plain)
        image = self._image.encode.remote(request) if plan_for(request).image_encode else None
        extra = {"caller": self._caller} if self._caller is not None else {}
        # Requests with the same LoRAs go to a DiT replica that has them (Serve model multiplexing
        # on the LoRA set; the worker's LoRABank keeps the tensors).
        stream = self._dit.options(stream=True, multiplexed_model_id=lora_set_id(plain)).denoise.remote(
            job_id, plain, text, image, **extra)
        latents: LatentsRef | None = None
        try:
            async for event in stream:
                if isinstance(event, DenoiseProgress):
                    if event.step == 0:
                        self.store.set_status(job_id, "in_progress", progress=0)
                        self._set_state(job_id, "in_progress")
                    else:
                        self.store.set_progress(job_id, DENOISE_SHARE * event.step // event.total)
                else:
                    latents = event
        except asyncio.CancelledError:
            stream.cancel()
            raise
        if latents is None:
            raise RuntimeError("the DiT group finished without returning latents")
        return latents

    async def _retry_busy(self, job_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """`await call()`, again after a backoff while a stage's queue is full
        (`BackPressureError`) or the DiT replica is being replaced (`DiTGroupUnavailable`), for
        up to `ingress.busy_timeout_s`. Only the rejected step is repeated: a full decoder queue
        never re-runs the denoising (a refused DiT call does re-run the short encoder calls,
        which are part of the `_denoise` step)."""
        deadline = time.monotonic() + self.args.ingress.busy_timeout_s
        backoff = 0.5
        while True:
            try:
                return await call()
            except (BackPressureError, DiTGroupUnavailable) as err:
                if time.monotonic() + backoff > deadline:
                    raise
                self.busy_retries += 1
                log.info("job %s: %s; retrying in %.1f s", job_id,
                         "a stage queue is full" if isinstance(err, BackPressureError)
                         else "the DiT replica is being replaced", backoff)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 10.0)

    # ------------------------------------------------------------------ runner upkeep
    def _set_state(self, job_id: str, state: str) -> None:
        self._states[job_id] = state
        self._publish_gauges()

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._states.pop(job_id, None)
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        queued = sum(1 for s in self._states.values() if s == "queued")
        metrics.set_gauge("lightx2v_jobs", queued, state="queued")
        metrics.set_gauge("lightx2v_jobs", len(self._states) - queued, state="in_progress")
        metrics.set_gauge("lightx2v_queue_depth", queued, stage="ingress")

    def _ensure_maintainer(self) -> None:
        """Start the upkeep loop on this replica's event loop (once there is one)."""
        if self._maintainer is not None and not self._maintainer.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # built outside an event loop: started by the first call
        self._maintainer = loop.create_task(self._maintain(), context=contextvars.Context())

    async def _maintain(self) -> None:
        """Heartbeat; cancel this replica's jobs deleted elsewhere; fail other runners' orphans."""
        while True:
            await asyncio.sleep(MAINTAIN_S)
            try:
                self.store.heartbeat(self.runner)
                mine = list(self._tasks)
                for job_id in set(mine) - self.store.existing(mine):
                    log.info("job %s was deleted through another replica: cancelling it", job_id)
                    self._tasks[job_id].cancel()
                if time.monotonic() - self._last_sweep > self.settings.job_lease_s / 3:
                    self._last_sweep = time.monotonic()
                    orphans = self.store.fail_orphaned(self.settings.job_lease_s)
                    if orphans:
                        log.warning("failed %d jobs whose ingress replica stopped: %s", len(orphans), orphans)
                        metrics.inc("lightx2v_jobs_finished_total", len(orphans), model=self.spec.name,
                                    status="failed", reason="interrupted")
                self._publish_gauges()
            except Exception:  # noqa: BLE001 - keep the loop alive; the next tick retries
                log.exception("ingress upkeep failed")

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            try:
                store.retire(self.runner)  # its running jobs become orphans at once
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    # ------------------------------------------------------------------ HTTP
    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after __init__: the FastAPI app, routes closed over this replica."""
        from serving.images_api import add_image_routes

        app = build_http_app(self)
        add_image_routes(app, self)  # the Images API (image models; a 400 for video models)
        return app


def _own_actor_handle():
    """This replica's actor handle (given to the DiT group to watch), None outside an actor."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().current_actor
    except Exception:  # noqa: BLE001 - not in an actor (a driver building the class directly)
        return None


def _error_message(err: BaseException) -> str:
    """The root cause's message, first line, fit for clients (no remote tracebacks, addresses,
    process ids in the job record)."""
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    text = str(cause).strip().splitlines()
    return public_message(f"{type(cause).__name__}: {text[0] if text else ''}")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _request_fields(request: Request, settings: ServiceSettings) -> dict[str, Any]:
    """JSON body or multipart form (OpenAI's client always sends multipart for videos.create).
    Form-encoded bodies are refused: a browser sends them cross-site without a preflight."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        limit = settings.max_upload_bytes
        form = await request.form(max_files=4, max_fields=MAX_FORM_FIELDS, max_part_size=1024 * 1024)
        fields: dict[str, Any] = {}
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read(limit + 1)
                    if len(data) > limit:
                        raise ApiError(413, f"{key}: file larger than {limit} bytes", param=key)
                    fields[key] = data
                else:
                    fields[key] = value
        finally:
            await form.close()
        return fields
    if media_type in ("application/json", ""):
        body = await request.body()
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            why = "nested too deeply" if isinstance(err, RecursionError) else "not valid JSON"
            raise ApiError(400, f"the body is {why}") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "the body must be a JSON object")
        return parsed
    raise ApiError(415, f"content type {media_type!r} is not accepted: send application/json "
                        "or multipart/form-data")


def _json_type(name: str) -> str:
    """The JSON schema type of a request field, from its annotation."""
    annotation = str(GenerationRequest.model_fields[name].annotation) if name in GenerationRequest.model_fields else ""
    return "integer" if "int" in annotation else "number" if "float" in annotation else "string"


_FIELD_TYPES = {name: _json_type(name) for name in OUR_FIELDS}
_BODY_SCHEMA = {
    "type": "object", "required": ["prompt"],
    "properties": {
        **{name: {"type": _FIELD_TYPES.get(name, "string")} for name in OPENAI_FIELDS + OUR_FIELDS},
        "seconds": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        "input_reference": {"anyOf": [{"type": "string", "format": "binary"}, {
            "type": "object", "properties": {"image_url": {"type": "string"}}}]},
    },
}
"""The create body, for the OpenAPI document (the handler itself validates every field)."""
_OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _BODY_SCHEMA}, "multipart/form-data": {"schema": _BODY_SCHEMA}}}}


def build_http_app(ingress: Ingress) -> FastAPI:
    """The HTTP routes. Every error is OpenAI-shaped: {"error": {message, type, param, code}}."""
    settings = ingress.settings
    app = FastAPI(title="lightx2v video generation", version="1", docs_url=None, redoc_url=None,
                  default_response_class=OpenAIJSONResponse)

    # 1. Errors: ours, Starlette's (unknown route, wrong method, bad form), FastAPI's, and the rest.
    def answer(err: ApiError) -> OpenAIJSONResponse:
        metrics.inc("lightx2v_http_errors_total", status=err.status, code=err.code)
        return err.response()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> OpenAIJSONResponse:
        return answer(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> OpenAIJSONResponse:
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return answer(ApiError(err.status_code, message, headers=dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> OpenAIJSONResponse:
        first = (err.errors() or [{}])[0]
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return answer(ApiError(400, f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request",
                               param=field))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> OpenAIJSONResponse:
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=err)
        return answer(ApiError(500, "internal error; the service log has the details"))

    # 2. Limits before anything reads the body; CORS outermost (preflights), only when configured.
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes,
                       max_multipart_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    # 3. Who calls: cross-site writes refused, then the API key (when keys are configured).
    async def caller(request: Request) -> str | None:
        check_origin(request.method, request.headers, settings.cors_origins)
        return ingress.keys.owner(request.headers.get("authorization"))

    who = Depends(caller)

    @app.post("/v1/videos", openapi_extra=_OPENAPI_BODY)
    async def create_video(request: Request, owner: str | None = who) -> OpenAIJSONResponse:
        fields = await _request_fields(request, settings)
        return OpenAIJSONResponse(await ingress.submit(fields, owner))

    @app.get("/v1/videos")
    async def list_videos(owner: str | None = who, limit: str = "20", after: str | None = None,
                          order: str = "desc") -> dict:
        try:
            n = int(limit)
        except ValueError:
            raise ApiError(400, f"limit must be an integer, got {limit[:32]!r}", param="limit") from None
        return ingress.list_videos(limit=n, after=after, order=order, owner=owner)

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str, owner: str | None = who) -> dict:
        return await ingress.status(video_id, owner)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, owner: str | None = who, variant: str = "video") -> FileResponse:
        job = ingress._get(video_id, owner)
        if variant != "video":
            raise ApiError(400, f"variant must be 'video' (thumbnails and spritesheets are not "
                                f"made), got {variant[:32]!r}", param="variant")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed: no content yet",
                           param="video_id")
        path = ingress.store.result_path(job.id)
        if path is None or not path.is_file():
            raise ApiError(404, f"the file of video {video_id} is missing", param="video_id")
        return FileResponse(path, media_type=job.result.mime, filename=f"{job.id}{job.result.ext}")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str, owner: str | None = who) -> dict:
        return await ingress.delete(video_id, owner)

    @app.get("/v1/models")
    async def list_models(owner: str | None = who) -> dict:
        specs = getattr(ingress, "specs", None) or [ingress.spec]  # the router serves several
        return {"object": "list", "data": [model_object(s) for s in specs]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pending_jobs": len(ingress._tasks),
                "busy_retries": ingress.busy_retries}

    return app


__all__ = ["Ingress", "build_http_app", "MAINTAIN_S"]

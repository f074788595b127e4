"""The ingress: HTTP (OpenAI-compatible Videos API) and handle methods, jobs, the job store.

A job is an asyncio task in this replica that chains the stage deployments (see
serving/deployments.py for how progress and latents flow):

    TextEncoder.encode ──┐ (DeploymentResponses passed on, not awaited here)
    ImageEncoder.encode ─┴─> DiTGroup.denoise (stream: progress events, then a LatentsRef)
                                  └─> VAEDecoder.decode(LatentsRef) -> MP4 bytes -> job store

Job status: `queued` until the DiT group takes the job, `in_progress` while it denoises
(progress 0..95 with the steps) and decodes, then `completed` (progress 100) or `failed`.
Admission: at most `ingress.max_pending_jobs` queued+running jobs, beyond that 503 with
Retry-After. A stage whose own queue is full (`BackPressureError`, from `max_queued_requests`)
makes the job wait and retry (it stays `queued`) for up to `ingress.busy_timeout_s`, then fail
with code `server_busy`. So does a DiT replica whose worker group failed and that waits to be
replaced (`DiTGroupUnavailable`: the job had not started there).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from serving.api import (ApiError, build_request, format_seconds, model_object, request_params,
                         video_object)
from serving.config import AppArgs, import_object
from serving.deployments import DenoiseProgress, DiTGroupUnavailable, LatentsRef
from serving.jobstore import JobNotFound, JobRecord, SQLiteJobStore, new_job_id
from stages.request import ResolvedRequest

log = logging.getLogger("ray.serve")

T = TypeVar("T")

DENOISE_SHARE = 95
"""Progress points given to denoising; the decode takes the job to 100."""
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
LIST_LIMIT_MAX = 100


class Ingress:
    """FastAPI ingress + handle API. `text`, `image` (None for T2V-only models), `dit` and
    `decoder` are the handles of the stage deployments (bound in `serving.app.build_app`)."""

    def __init__(self, args: dict[str, Any], text: DeploymentHandle, image: DeploymentHandle | None,
                 dit: DeploymentHandle, decoder: DeploymentHandle) -> None:
        self.args = AppArgs.model_validate(args)
        self.spec = import_object(self.args.engine_cls).resolve(self.args.model)
        self.served_names = tuple(dict.fromkeys((self.spec.name, self.args.model)))
        self.store = SQLiteJobStore(self.args.data_dir)
        interrupted = self.store.fail_interrupted()
        if interrupted:
            log.warning("marked %d interrupted jobs failed: %s", len(interrupted), interrupted)
        self._text, self._image, self._dit, self._decoder = text, image, dit, decoder
        self._tasks: dict[str, asyncio.Task] = {}
        self.busy_retries = 0
        """How often a job found a stage queue full and retried (exposed on /health)."""

    # ------------------------------------------------------------------ handle API (and HTTP)
    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Validate, create a job, start it; returns the video object at once."""
        resolved = build_request(dict(request), self.spec, self.served_names)
        if len(self._tasks) >= self.args.ingress.max_pending_jobs:
            raise ApiError(503, f"too many pending jobs ({len(self._tasks)}); retry later",
                           headers={"Retry-After": str(self.args.ingress.retry_after_s)})
        job = self.store.create(JobRecord(
            id=new_job_id(), created_at=int(time.time()), status="queued", model=self.spec.name,
            prompt=resolved.prompt, size=f"{resolved.width}x{resolved.height}",
            seconds=format_seconds(resolved.kept_frames, resolved.fps),
            params=request_params(resolved)))
        # A fresh context: the job must not be tied to (and cancelled with) the HTTP request.
        task = asyncio.get_running_loop().create_task(
            self._run_job(job.id, resolved), context=contextvars.Context())
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, job_id=job.id: self._tasks.pop(job_id, None))
        return video_object(job)

    async def status(self, video_id: str) -> dict[str, Any]:
        return video_object(self._get(video_id))

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Submit and wait for the finished video: the video object plus `video_bytes` (MP4)
        and `path` (the file in the data dir, for callers on the same machine)."""
        video = await self.submit(request)
        task = self._tasks.get(video["id"])
        if task is not None:
            await asyncio.wait([task])  # not cancelled with the caller; a DELETE ends it
        job = self._get(video["id"])
        out = video_object(job)
        if job.status == "completed":
            path = self.store.result_path(job.id)
            out["video_bytes"] = path.read_bytes()
            out["path"] = str(path)
        return out

    async def delete(self, video_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (its DiT work stops at the next step), or delete a
        finished one with its file."""
        self._get(video_id)  # 404 for unknown ids
        task = self._tasks.get(video_id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=60)
        self.store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def list_videos(self, limit: int = 20, after: str | None = None, order: str = "desc") -> dict[str, Any]:
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ApiError(400, f"limit must be in 1..{LIST_LIMIT_MAX}, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        try:
            jobs, has_more = self.store.list(limit=limit, after=after, order=order)
        except JobNotFound:  # the `after` cursor names no job
            raise ApiError(404, f"no video with id {after!r}", param="after") from None
        data = [video_object(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    def _get(self, video_id: str, param: str = "video_id") -> JobRecord:
        try:
            return self.store.get(video_id)
        except JobNotFound:
            raise ApiError(404, f"no video with id {video_id!r}", param=param) from None

    # ------------------------------------------------------------------ the job
    async def _run_job(self, job_id: str, request: ResolvedRequest) -> None:
        try:
            # 1. Encoders + DiT group -> a reference to the latents.
            latents = await self._retry_busy(job_id, lambda: self._denoise(job_id, request))
            # 2. Decode (the decoder fetches the latents itself) and store the MP4.
            video = await self._retry_busy(job_id, lambda: self._decoder.decode.remote(request, latents))
            self.store.save_result(job_id, video.data)
            self.store.set_status(job_id, "completed", progress=100)
        except asyncio.CancelledError:
            log.info("job %s cancelled", job_id)
            raise
        except BackPressureError:
            self.store.set_status(job_id, "failed", error_code="server_busy",
                                  error_message=f"stage queues stayed full for "
                                                f"{self.args.ingress.busy_timeout_s:.0f} s")
        except Exception as err:  # noqa: BLE001 - any failure ends the job with its message
            log.exception("job %s failed", job_id)
            self.store.set_status(job_id, "failed", error_code="generation_failed",
                                  error_message=_error_message(err))

    async def _denoise(self, job_id: str, request: ResolvedRequest) -> LatentsRef:
        # Encoder responses are passed on unawaited: Serve resolves them object store to object
        # store before the DiT call is assigned to a replica.
        text = self._text.encode.remote(request)
        image = self._image.encode.remote(request) if request.image is not None else None
        stream = self._dit.options(stream=True).denoise.remote(job_id, request, text, image)
        latents: LatentsRef | None = None
        try:
            async for event in stream:
                if isinstance(event, DenoiseProgress):
                    if event.step == 0:
                        self.store.set_status(job_id, "in_progress", progress=0)
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

    # ------------------------------------------------------------------ HTTP
    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after __init__: the FastAPI app, routes closed over this replica."""
        return build_http_app(self)


def _error_message(err: BaseException) -> str:
    """The root cause's message, first line (no remote tracebacks in the job record)."""
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


async def _request_fields(request: Request) -> dict[str, Any]:
    """JSON body or multipart form (OpenAI's client always sends multipart for videos.create)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data") or content_type.startswith(
            "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(MAX_UPLOAD_BYTES + 1)
                if len(data) > MAX_UPLOAD_BYTES:
                    raise ApiError(413, f"{key}: file larger than {MAX_UPLOAD_BYTES} bytes", param=key)
                fields[key] = data
            else:
                fields[key] = value
        return fields
    if content_type.startswith("application/json") or not content_type:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body
    raise ApiError(415, f"content type {content_type!r} is not accepted: send application/json "
                        "or multipart/form-data")


def build_http_app(ingress: Ingress) -> FastAPI:
    """The HTTP routes. Every error is OpenAI-shaped: {"error": {message, type, param, code}}."""
    app = FastAPI(title="lightx2v video generation", version="1")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        return JSONResponse(await ingress.submit(await _request_fields(request)))

    @app.get("/v1/videos")
    async def list_videos(limit: str = "20", after: str | None = None, order: str = "desc") -> dict:
        try:
            n = int(limit)
        except ValueError:
            raise ApiError(400, f"limit must be an integer, got {limit!r}", param="limit") from None
        return ingress.list_videos(limit=n, after=after, order=order)

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str) -> dict:
        return await ingress.status(video_id)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video") -> FileResponse:
        job = ingress._get(video_id)
        if variant != "video":
            raise ApiError(400, f"variant must be 'video' (thumbnails and spritesheets are not "
                                f"made), got {variant!r}", param="variant")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed: no content yet",
                           param="video_id")
        path = ingress.store.result_path(job.id)  # well-formed id checked by the store
        if not path.is_file():
            raise ApiError(404, f"the file of video {video_id} is missing", param="video_id")
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> dict:
        return await ingress.delete(video_id)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_object(ingress.spec)]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pending_jobs": len(ingress._tasks),
                "busy_retries": ingress.busy_retries}

    return app


__all__ = ["Ingress", "build_http_app"]

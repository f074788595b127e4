"""Stage deployments: thin Ray Serve wrappers around the stage objects of `stages/`.

No model code here. Each class takes the app's arguments as a plain dict (`AppArgs`), builds
its stage through the injectable engine (`AppArgs.engine_cls`) and exposes one method. The
classes are plain Python; `serving.app.build_app` turns them into deployments with options
computed in `serving.config.deployment_options`.

How progress and latents flow (tensors never pass through the ingress):

1. The ingress calls `TextEncoder.encode` / `ImageEncoder.encode` and passes the returned
   `DeploymentResponse`s straight into `DiTGroup.denoise`; Serve resolves them object store to
   object store, and the DiT call is assigned to a replica only once they are ready, so a queued
   job never holds a DiT slot while its text is being encoded.
2. `DiTGroup.denoise` is a streaming method. It takes the group's lock (one job at a time, as
   every rank must run the same collectives in the same order), starts `denoise` on every rank,
   and while the ranks work it asks rank 0 for `progress(job_id)` every `progress_poll_s` and
   yields a small `DenoiseProgress(step, total)` whenever the step count moves. The ingress
   turns each event into the job's `progress` in the job store.
3. The last event is a `LatentsRef`: a reference to rank 0's `Latents` in the object store, not
   the tensor. The ingress hands it to `VAEDecoder.decode`, which fetches the latents itself, so
   the latents go DiT worker -> decoder, and only the MP4 bytes come back to the ingress.
4. Cancelling the ingress's call (DELETE of a running job) raises `CancelledError` inside
   `denoise` at its next await; the replica then tells every rank `cancel(job_id)` (the denoise
   loop stops at the next step) and waits for the ranks to stop before releasing the lock.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray

from cluster import WorkerGroup, WorkerGroupError
from serving.config import AppArgs, import_object
from stages.payloads import EncodedVideo, ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class DenoiseProgress:
    """`step` of `total` denoising steps are done (0 = the job got the DiT group)."""

    step: int
    total: int


@dataclass(frozen=True)
class LatentsRef:
    """The finished latents of one job, left in the object store (rank 0's `Latents`)."""

    ref: ray.ObjectRef


def make_engine(args: AppArgs):
    """The app's stage engine (`args.engine_cls`) for this replica."""
    return import_object(args.engine_cls)(args.model, args.engine_options(), **args.engine_kwargs)


async def _await(ref: ray.ObjectRef) -> Any:
    return await ref


class TextEncoder:
    """Text encoder pool: prompt (and negative prompt) -> `TextEmbeds`."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stage = make_engine(AppArgs.model_validate(args)).text_stage()

    def encode(self, request: ResolvedRequest) -> TextEmbeds:
        # A sync method: Serve runs it in a thread, the replica's event loop stays free.
        return self.stage(request)


class ImageEncoder:
    """Image encoder pool (image-to-video): image -> `ImageCond` (CLIP tokens + VAE latents)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stage = make_engine(AppArgs.model_validate(args)).image_stage()

    def encode(self, request: ResolvedRequest) -> ImageCond:
        return self.stage(request)


class VAEDecoder:
    """Decoder pool: latents -> frames -> MP4 bytes (`EncodedVideo`)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stage = make_engine(AppArgs.model_validate(args)).decode_stage()

    async def decode(self, request: ResolvedRequest, latents: LatentsRef) -> EncodedVideo:
        value: Latents = await latents.ref  # fetched here, straight from the DiT worker
        return await asyncio.to_thread(self.stage, request, value)


class DiTGroup:
    """One replica = one worker group of `cfg_parallel * ulysses_degree` ranks (one GPU each, in
    the replica's placement group). See the module docstring for the progress protocol."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        worker_cls = import_object(self.args.dit_worker_cls)
        self.group = WorkerGroup(
            worker_cls, self.args.world_size,
            gpus_per_worker=self.args.dit.gpus_per_worker if self.args.use_gpus else 0.0)
        self.group.start(**self.args.dit_worker_kwargs)
        self.group.get(self.group.call("load_model", self.args.model, self.args.engine_options()))
        self.group.get(self.group.call("warm_up"))
        self._lock = asyncio.Lock()
        self._poll_s = self.args.dit.progress_poll_s

    async def denoise(self, job_id: str, request: ResolvedRequest, text: TextEmbeds,
                      image: ImageCond | None) -> AsyncIterator[DenoiseProgress | LatentsRef]:
        """Yields `DenoiseProgress` events, then one `LatentsRef` (streaming method)."""
        async with self._lock:
            yield DenoiseProgress(0, request.steps)
            # 1. Every rank gets the inputs (WorkerGroup.call stores them once for all ranks).
            refs = self.group.call("denoise", request, text, image, job_id=job_id)
            # Awaiting a ref fetches it: for rank 0 that is the latents (MBs, same node), cheap.
            futures = [asyncio.ensure_future(_await(r)) for r in refs]
            try:
                # 2. Poll rank 0's step count until every rank finished (or one failed).
                last = 0
                while True:
                    _, pending = await asyncio.wait(futures, timeout=self._poll_s,
                                                    return_when=asyncio.FIRST_EXCEPTION)
                    if not pending or any(f.done() and f.exception() for f in futures):
                        break
                    progress = await self.group.call_rank(0, "progress", job_id)
                    step = progress["step"] if progress is not None else 0
                    if step > last:
                        last = step
                        yield DenoiseProgress(step, request.steps)
                # 3. Raise a rank's error here (also the cancellation of a worker), not in the decoder.
                try:
                    await asyncio.gather(*futures)
                except ray.exceptions.RayActorError as err:
                    raise WorkerGroupError(self.group.failure or f"a DiT worker died: {err}") from err
            except (asyncio.CancelledError, GeneratorExit):
                # Cancelled while awaiting (CancelledError) or while suspended at a yield (the
                # stream is closed: GeneratorExit): either way the ranks must stop.
                await self._cancel(job_id, futures)
                raise
        if last < request.steps:
            yield DenoiseProgress(request.steps, request.steps)
        yield LatentsRef(refs[0])

    async def _cancel(self, job_id: str, futures: list[asyncio.Future]) -> None:
        """Tell every rank to stop this job and wait until they did (bounded)."""
        log.info("DiTGroup: cancelling job %s", job_id)
        start = time.monotonic()
        try:
            self.group.call("cancel", job_id)
            await asyncio.wait(futures, timeout=60)
        except Exception as err:  # noqa: BLE001 - the group may be broken; health check reports it
            log.warning("DiTGroup: cancelling %s failed: %s", job_id, err)
        log.info("DiTGroup: job %s stopped %.2f s after cancel", job_id, time.monotonic() - start)

    def check_health(self) -> None:
        """Serve calls this periodically; a dead rank fails it and Serve replaces the replica."""
        self.group.check_health()

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()

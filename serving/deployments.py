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
5. A rank that raises while the others wait in a collective leaves the group out of step:
   `WorkerGroup.aget` fails the group after a short grace (its workers are killed), the job fails
   with that rank's error, `check_health` fails and Serve replaces the replica. A dead rank does
   the same through the group's liveness monitor. Jobs that reach the replica before it is
   replaced are refused unstarted (`DiTGroupUnavailable`) and retried by the ingress.
6. Orphans: the ingress passes its replica's actor handle (`caller`) with each job. Ray does not
   cancel a call whose caller died, so the replica checks: before a job starts (it may have
   waited for the group) and every `CALLER_CHECK_S` while it runs, it pings the caller
   (`__ray_ready__`); a dead caller's job is not started, or cancelled on every rank like a
   DELETE, and counted in `lightx2v_orphaned_jobs_total`. The caller's own replacement fails the
   job in the store (the runner lease in serving/ingress.py).

Each stage call is metered (`serving.metrics`): calls running, time per call and per denoising
step, failures by exception type, GPU memory of the process (and of each DiT rank when its
worker reports it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray
from ray import serve

from cluster import WorkerGroupError
from serving import metrics
from serving.config import AppArgs, import_object
from serving.metrics import StageMeter
from stages.payloads import EncodedVideo, ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

log = logging.getLogger("ray.serve")

CANCEL_TIMEOUT_S = 60.0
"""How long a cancelled job's ranks may take to stop before the group is failed."""
CALLER_CHECK_S = 1.0
"""How often a running job's caller (the ingress replica) is checked for life."""
CALLER_PING_TIMEOUT_S = 10.0
"""A caller that does not answer within this is taken as alive but busy (only death cancels)."""


class DiTGroupUnavailable(RuntimeError):
    """This replica's worker group has failed and the replica waits to be replaced; the job did
    not start. The ingress retries it (Serve routes it to a healthy or the new replica)."""

    @classmethod
    def for_job(cls, job_id: str, failure: str) -> "DiTGroupUnavailable":
        return cls(f"job {job_id} not started: this DiT replica is being replaced ({failure})")


class OrphanedJob(RuntimeError):
    """The job's caller (its ingress replica) died: its work was stopped or never started."""


async def caller_alive(caller: Any) -> bool:
    """False only when the actor `caller` is dead (a ping that times out counts as alive)."""
    try:
        await asyncio.wait_for(caller.__ray_ready__.remote(), timeout=CALLER_PING_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        return False
    except asyncio.TimeoutError:
        log.warning("the caller did not answer a ping within %.0f s; taken as alive", CALLER_PING_TIMEOUT_S)
    return True


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


class TextEncoder:
    """Text encoder pool: prompt (and negative prompt) -> `TextEmbeds`."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stage = make_engine(AppArgs.model_validate(args)).text_stage()
        self.meter = StageMeter("text_encode")

    def encode(self, request: ResolvedRequest) -> TextEmbeds:
        # A sync method: Serve runs it in a thread, the replica's event loop stays free.
        with self.meter.call():
            return self.stage(request)


class ImageEncoder:
    """Image encoder pool (image-to-video): image -> `ImageCond` (CLIP tokens + VAE latents)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stage = make_engine(AppArgs.model_validate(args)).image_stage()
        self.meter = StageMeter("image_encode")

    def encode(self, request: ResolvedRequest) -> ImageCond:
        with self.meter.call():
            return self.stage(request)


class VAEDecoder:
    """Decoder pool: latents -> frames -> MP4 bytes (`EncodedVideo`)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stage = make_engine(AppArgs.model_validate(args)).decode_stage()
        self.meter = StageMeter("decode")

    async def decode(self, request: ResolvedRequest, latents: LatentsRef) -> EncodedVideo:
        with self.meter.call():
            value: Latents = await latents.ref  # fetched here, straight from the DiT worker
            return await asyncio.to_thread(self.stage, request, value)


LORA_SETS_PER_REPLICA = 8
"""LoRA sets a DiT replica is routed as holding (Serve multiplexing; the LoRABank bounds the tensors)."""


def lora_set_id(request: ResolvedRequest) -> str:
    """The multiplexing id of a request's LoRAs ("" = none): requests with the same set are routed
    to a DiT replica that served it recently (`DiTGroup.lora_set`)."""
    return "+".join(sorted(f"{lora.name or lora.path}@{lora.strength}:{lora.expert or 'all'}"
                           for lora in request.lora))


class DiTGroup:
    """One replica = one worker group of `cfg_parallel * ulysses_degree` ranks (one GPU each, in
    the replica's placement group). See the module docstring for the progress protocol."""

    @serve.multiplexed(max_num_models_per_replica=LORA_SETS_PER_REPLICA)
    async def lora_set(self, set_id: str) -> str:
        """Serve's record of the LoRA sets this replica holds (for routing); the workers' LoRABank
        loads and evicts the tensors themselves."""
        return set_id

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        from cluster.dit_worker import start_dit_group

        self.group = start_dit_group(
            import_object(self.args.dit_worker_cls), self.args.world_size, self.args.model,
            self.args.engine_options(),
            gpus_per_worker=self.args.dit.gpus_per_worker if self.args.use_gpus else 0.0,
            **self.args.dit_worker_kwargs)  # a replica that fails to start leaves no workers behind
        self._lock = asyncio.Lock()
        self._poll_s = self.args.dit.progress_poll_s
        self._waiting = 0
        self._running: str | None = None
        self._orphans_stopped = 0
        self.meter = StageMeter("denoise")

    def status(self) -> dict[str, Any]:
        """What this replica does now (handle only, for operators and tests): the job on the
        group, the jobs waiting for it, orphaned jobs stopped so far, the ranks' process ids."""
        return {"job": self._running, "waiting": self._waiting, "orphans_stopped": self._orphans_stopped,
                "worker_pids": [r.pid for r in self.group.ranks], "failure": self.group.failure}

    async def denoise(self, job_id: str, request: ResolvedRequest, text: TextEmbeds,
                      image: ImageCond | None, caller: Any = None) -> AsyncIterator[DenoiseProgress | LatentsRef]:
        """Yields `DenoiseProgress` events, then one `LatentsRef` (streaming method). `caller`:
        the calling ingress replica's actor handle; the job stops if that actor dies."""
        self._waiting += 1
        metrics.set_gauge("lightx2v_queue_depth", self._waiting, stage="denoise")
        try:
            await self._lock.acquire()  # one job at a time on the group
        finally:
            self._waiting -= 1
            metrics.set_gauge("lightx2v_queue_depth", self._waiting, stage="denoise")
        try:
            with self.meter.call():
                if self.group.failure is not None:
                    raise DiTGroupUnavailable.for_job(job_id, self.group.failure)
                if caller is not None and not await caller_alive(caller):
                    self._orphans_stopped += 1
                    metrics.inc("lightx2v_orphaned_jobs_total")
                    log.warning("DiTGroup: job %s not started: its ingress replica is gone", job_id)
                    raise OrphanedJob(f"job {job_id} not started: its caller is gone")
                if set_id := serve.get_multiplexed_model_id():
                    await self.lora_set(set_id)
                yield DenoiseProgress(0, request.steps)
                # 1. Every rank gets the inputs (WorkerGroup.call stores them once for all ranks).
                self._running = job_id
                try:
                    refs = self.group.call("denoise", request, text, image, job_id=job_id)
                except WorkerGroupError as err:  # failed since the check above: still not started
                    raise DiTGroupUnavailable.for_job(job_id, str(err)) from None
                # 2. Wait for all ranks through the group, not on the refs themselves: when one
                #    rank raises while the others wait in a collective it never joins, `aget`
                #    fails the group after a short grace (the stuck ranks are killed,
                #    `check_health` fails and Serve replaces this replica) instead of leaving
                #    them blocked until the process-group timeout, with the next job queued
                #    behind them. Meanwhile: progress events, and the caller checked for life.
                done = asyncio.ensure_future(self.group.aget(refs))
                try:
                    last, last_t = 0, time.monotonic()
                    next_check = last_t + CALLER_CHECK_S
                    while not (await asyncio.wait([done], timeout=self._poll_s))[0]:
                        step = await self._progress(job_id)
                        if step > last:
                            now = time.monotonic()
                            for _ in range(step - last):  # steps seen together share the time
                                metrics.observe("lightx2v_denoise_step_seconds", (now - last_t) / (step - last))
                            last, last_t = step, now
                            yield DenoiseProgress(step, request.steps)
                        if caller is not None and time.monotonic() >= next_check:
                            next_check = time.monotonic() + CALLER_CHECK_S
                            if not await caller_alive(caller):
                                self._orphans_stopped += 1
                                metrics.inc("lightx2v_orphaned_jobs_total")
                                log.warning("DiTGroup: job %s: its ingress replica died; cancelling", job_id)
                                await self._cancel(job_id, done)
                                raise OrphanedJob(f"job {job_id} cancelled: its caller is gone")
                    # 3. Raise a rank's error here (also the cancellation of a worker), not in
                    #    the decoder. A dead rank arrives as a WorkerGroupError naming it.
                    await done
                except (asyncio.CancelledError, GeneratorExit):
                    # Cancelled while awaiting (CancelledError) or while suspended at a yield
                    # (the stream is closed: GeneratorExit): either way the ranks must stop.
                    await self._cancel(job_id, done)
                    raise
        finally:
            self._running = None
            self._lock.release()
        if last < request.steps:
            yield DenoiseProgress(request.steps, request.steps)
        yield LatentsRef(refs[0])

    async def _progress(self, job_id: str) -> int:
        """Rank 0's finished step count (0 if unknown). Never raises: the job's outcome is the
        ranks' results (a group that broke meanwhile says why there), not a progress query's."""
        try:
            progress = await self.group.call_rank(0, "progress", job_id)
        except (WorkerGroupError, ray.exceptions.RayActorError):
            return 0
        except Exception as err:  # noqa: BLE001 - a broken progress() must not orphan the ranks
            log.warning("DiTGroup: progress(%s) on rank 0 failed: %s", job_id, err)
            return 0
        return progress["step"] if progress is not None else 0

    async def _cancel(self, job_id: str, done: asyncio.Future) -> None:
        """Tell every rank to stop this job and wait until they did. Ranks that do not stop within
        `CANCEL_TIMEOUT_S` leave the group in an unknown state: it is failed (the replica is
        replaced) rather than handed the next job."""
        log.info("DiTGroup: cancelling job %s", job_id)
        start = time.monotonic()
        try:
            self.group.call("cancel", job_id)
        except Exception as err:  # noqa: BLE001 - the group may be broken; health check reports it
            log.warning("DiTGroup: cancelling %s failed: %s", job_id, err)
        finished, _ = await asyncio.wait([done], timeout=CANCEL_TIMEOUT_S)
        if not finished:
            # Nobody awaits `done` any more: take its outcome when it comes (no asyncio warning).
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.group.fail(f"DiT group: the ranks did not stop within {CANCEL_TIMEOUT_S:.0f} s "
                            f"of cancelling job {job_id}; start a new group")
            return
        error = None if done.cancelled() else done.exception()  # Cancelled, as asked
        log.info("DiTGroup: job %s stopped %.2f s after cancel (%s)", job_id,
                 time.monotonic() - start, type(error).__name__ if error else "finished")

    def check_health(self) -> None:
        """Serve calls this periodically; a failure gets the replica (and its group) replaced.

        Fails when a rank died or the group is out of step, and when a rank's own
        `check_health` fails (e.g. a sticky CUDA error): such a rank would fail every job while
        all its actors are alive."""
        self.group.check_health()
        timeout = self.args.dit.health_check_timeout_s / 2  # answer before Serve's own timeout
        try:
            reports = self.group.get(self.group.call("check_health"), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise WorkerGroupError(f"DiT group: a rank did not answer check_health within "
                                   f"{timeout:g} s") from None
        for rank, report in enumerate(reports or ()):  # GPU memory, where the worker reports it
            if isinstance(report, dict) and report.get("gpu_memory_bytes") is not None:
                metrics.record_gpu_memory("denoise", rank, report["gpu_memory_bytes"],
                                          report.get("gpu_peak_bytes"))

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()

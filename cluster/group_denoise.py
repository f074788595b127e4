"""The denoise stage of an in-process pipeline, run on a DiT worker group.

`GroupDenoiseStage` stands in for `stages.DenoiseStage` inside `stages.pipeline.LocalPipeline`
(same call: `stage(request, text, image, timings=, progress=, should_cancel=) -> Latents`) when
the engine options ask for more than one rank: the library (`LightX2V.from_pretrained(...,
parallel={"cfg": 2, "ulysses": 2})`) and the CLI use it; the service's `DiTGroup` deployment drives
a `WorkerGroup` itself.

It starts Ray locally when no Ray instance is connected, one worker per rank (one GPU each on
CUDA, gloo on CPU), loads the DiT on every rank and warms it up. Requests run one at a time
(concurrent callers wait). While a request runs it polls rank 0's progress for the callback and
turns `should_cancel()` into a `cancel` on the group (asked before the request starts too).
"""
from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING

import ray

from cluster.dit_worker import DiTWorker, start_dit_group
from cluster.worker_group import WorkerGroup
from engine.options import EngineOptions
from stages.base import Cancelled, Stage
from stages.denoise import DenoiseStage
from stages.payloads import Latents

if TYPE_CHECKING:
    from engine.loading import Checkpoint
    from stages.denoise import CancelFn, ProgressFn
    from stages.payloads import ImageCond, TextEmbeds
    from stages.request import ResolvedRequest

log = logging.getLogger(__name__)

POLL_S = 0.1
"""How often progress and should_cancel are checked while the group denoises."""


def ensure_ray() -> None:
    """Connect to Ray: an existing instance when one is running/connected, else a local one."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


class GroupDenoiseStage(Stage):
    """Drop-in for `DenoiseStage` in a `LocalPipeline`; see the module docstring. `Stage.__call__`
    checks the request, times the call and checks the output (with `DenoiseStage`'s checks)."""

    name = "denoise"
    output_type = Latents
    check_output = DenoiseStage.check_output

    def __init__(self, group: WorkerGroup, options: EngineOptions) -> None:
        self.group = group
        self.options = options
        self._lock = threading.Lock()  # one request at a time on the group (see __call__)

    @classmethod
    def start(cls, ckpt: "Checkpoint | str", options: EngineOptions,
              timeout_s: float = 600, wait_for_gpus: bool = False) -> "GroupDenoiseStage":
        """Start the group for `options.parallel`, load the DiT of `ckpt` on it, warm it up.
        One GPU per rank on CUDA: more ranks than the cluster has GPUs is refused at once (a
        ValueError from `WorkerGroup.start`), unless `wait_for_gpus` (an autoscaling cluster:
        wait up to `timeout_s` for the nodes)."""
        ensure_ray()
        gpus = 1.0 if options.torch_device.type == "cuda" else 0.0
        group = start_dit_group(DiTWorker, options.parallel.world_size, ckpt, options,
                                gpus_per_worker=gpus, timeout_s=timeout_s, wait_for_gpus=wait_for_gpus)
        log.info("DiT group ready: %s", "; ".join(r.describe() for r in group.ranks))
        return cls(group, options)

    def forward(self, request: "ResolvedRequest", text: "TextEmbeds", image: "ImageCond | None" = None,
                progress: "ProgressFn | None" = None, should_cancel: "CancelFn | None" = None) -> Latents:
        job_id = uuid.uuid4().hex
        # One request at a time: the workers are threaded actors, so two `denoise` calls in flight
        # could start in different orders on different ranks and pair their collectives wrongly.
        with self._lock:
            # 1. Cancelled already (e.g. while waiting for the group): stop before step 1, as the
            #    in-process DenoiseStage does.
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"request cancelled before step 1 of {request.steps}")
            refs = self.group.call("denoise", request, text, image, job_id)
            # 2. Until the first rank returns: forward cancel, report rank 0's progress.
            last, cancel_sent = 0, False
            while not ray.wait(refs, num_returns=1, timeout=POLL_S)[0]:
                if should_cancel is not None and not cancel_sent and should_cancel():
                    self.group.call("cancel", job_id)
                    cancel_sent = True
                if progress is not None:
                    p = self.group.get(self.group.call_rank(0, "progress", job_id))
                    if p is not None and p["step"] > last:
                        last = p["step"]
                        progress(last, p["total"])
            # 3. All ranks. A rank that raised while the others wait in a collective fails the
            #    group after a short grace (WorkerGroup.get) instead of hanging until the timeout.
            latents = self.group.get(refs)[0]  # raises the workers' error (Cancelled, a dead rank)
        if progress is not None and last < request.steps:
            progress(request.steps, request.steps)
        return latents

    def check_health(self) -> None:
        self.group.check_health()

    def shutdown(self) -> None:
        self.group.shutdown()

"""`GroupDenoiseStage` request handling on a worker group of fake DiT workers (gloo, no model):
progress, cancellation (before and during a request), one request at a time, and a rank that fails
while the others wait in a collective."""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from cluster.group_denoise import GroupDenoiseStage
from cluster.worker_group import WorkerGroup, WorkerGroupError
from engine.options import EngineOptions, ParallelConfig
from stages.base import Cancelled
from stages.payloads import Latents, TextEmbeds
from stages.request import ResolvedRequest

pytestmark = pytest.mark.ray

STEP_S = 0.05
FAIL_ON_RANK_1 = "fail on rank 1"
OPTIONS = EngineOptions(parallel=ParallelConfig(cfg=2))
TEXT = TextEmbeds(context=torch.zeros(3, 4), negative_context=None)


class StepWorker:
    """Stands in for `DiTWorker`: `steps` sleeps of STEP_S; rank 0 returns the Latents."""

    def __init__(self) -> None:
        self.cancelled: set[str] = set()
        self.steps: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.calls = self.active = self.max_active = 0

    def init_device(self, ctx) -> None:
        self.ctx = ctx

    def denoise(self, request, text, image, job_id):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if request.prompt == FAIL_ON_RANK_1:
                if self.ctx.rank == 1:
                    raise ValueError("rank 1 failed before the collective")
                dist.all_reduce(torch.ones(1))  # rank 1 never joins
            for i in range(request.steps):
                if job_id in self.cancelled:
                    raise Cancelled(f"request cancelled before step {i + 1} of {request.steps}")
                time.sleep(STEP_S)
                self.steps[job_id] = {"step": i + 1, "total": request.steps}
            return Latents(torch.zeros(request.latent_shape)) if self.ctx.rank == 0 else None
        finally:
            with self.lock:
                self.active -= 1

    def progress(self, job_id: str) -> dict | None:
        return self.steps.get(job_id)

    def cancel(self, job_id: str) -> None:
        self.cancelled.add(job_id)

    def stats(self) -> dict:
        return {"calls": self.calls, "max_active": self.max_active}


def make_request(steps: int = 6, prompt: str = "p") -> ResolvedRequest:
    return ResolvedRequest(
        model="test", prompt=prompt, negative_prompt="", image=None, num_frames=1, height=16,
        width=16, steps=steps, guidance_scale=1.0, shift=3.0, sampler="euler", seed=0, fps=8,
        output_type="latent", latents=None, latent_shape=(16, 1, 2, 2))


@pytest.fixture(scope="module", autouse=True)
def _pickle_workers_by_value():
    # Ray workers cannot import this test module by name (pytest importlib mode): ship it by value.
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def stage(ray_session, _pickle_workers_by_value):
    group = WorkerGroup(StepWorker, 2, gpus_per_worker=0, timeout_s=60)
    try:
        group.start()
        yield GroupDenoiseStage(group, OPTIONS)
    finally:
        group.shutdown()


def test_progress_and_result(stage):
    seen: list[tuple[int, int]] = []
    timings: dict[str, float] = {}
    out = stage(make_request(steps=6), TEXT, progress=lambda s, t: seen.append((s, t)), timings=timings)
    assert isinstance(out, Latents) and out.latents.shape == (16, 1, 2, 2)
    assert seen[-1] == (6, 6) and [s for s, _ in seen] == sorted({s for s, _ in seen})
    assert timings["denoise"] >= 6 * STEP_S


def test_cancel_before_and_during_a_request(stage):
    calls = [s["calls"] for s in stage.group.get(stage.group.call("stats"))]
    with pytest.raises(Cancelled, match="before step 1 of 6"):
        stage(make_request(steps=6), TEXT, should_cancel=lambda: True)
    assert [s["calls"] for s in stage.group.get(stage.group.call("stats"))] == calls, \
        "a request cancelled before it starts never reaches the workers"

    seen: list[int] = []
    start = time.monotonic()
    with pytest.raises(Cancelled, match="cancelled before step"):
        stage(make_request(steps=200), TEXT, progress=lambda s, t: seen.append(s),
              should_cancel=lambda: bool(seen))
    assert time.monotonic() - start < 200 * STEP_S / 2
    stage.group.check_health()


def test_concurrent_requests_run_one_at_a_time(stage):
    """Two threads on one stage: each rank runs one `denoise` at a time, in the same order."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(stage(make_request(steps=8), TEXT)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and all(isinstance(r, Latents) for r in results)
    assert [s["max_active"] for s in stage.group.get(stage.group.call("stats"))] == [1, 1]


def test_rank_failing_while_others_wait_in_a_collective_fails_fast(ray_session):
    """Rank 1 raises while rank 0 waits in an all-reduce: the request fails within the straggler
    grace, not at the 60 s process-group timeout, and the out-of-step group is failed."""
    group = WorkerGroup(StepWorker, 2, gpus_per_worker=0, timeout_s=60)
    try:
        group.start()
        stage = GroupDenoiseStage(group, OPTIONS)
        start = time.monotonic()
        with pytest.raises(ValueError, match="rank 1 failed"):
            stage(make_request(prompt=FAIL_ON_RANK_1), TEXT, progress=lambda s, t: None)
        assert time.monotonic() - start < 20
        with pytest.raises(WorkerGroupError, match="out of step"):
            stage.check_health()
    finally:
        group.shutdown()


def test_more_ranks_than_gpus_is_refused_at_once(ray_session):
    """A CUDA group larger than the cluster's GPU count fails at start with the numbers (a
    ValueError, which the CLI prints as a usage error), instead of waiting for workers that can
    never be placed."""
    options = EngineOptions(device="cuda", parallel=ParallelConfig(cfg=2, ulysses=8))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"parallel: cfg=2 x ulysses=8 needs 16 GPUs .* has 8"):
        GroupDenoiseStage.start("tiny-wan", options, timeout_s=5)
    assert time.monotonic() - start < 3

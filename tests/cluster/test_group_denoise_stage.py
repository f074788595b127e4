"""`GroupDenoiseStage` request handling on a worker group of fake DiT workers
(`serving.fakes.FakeDiTWorker`, gloo, no model): progress, cancellation (before and during a
request), one request at a time, and a rank that fails while the others wait in a collective."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.group_denoise import GroupDenoiseStage
from cluster.worker_group import WorkerGroup, WorkerGroupError
from engine.options import EngineOptions, ParallelConfig
from serving.fakes import FakeDiTWorker
from stages.base import Cancelled
from stages.payloads import Latents, TextEmbeds
from stages.request import ResolvedRequest

pytestmark = pytest.mark.ray

STEP_S = 0.05
OPTIONS = EngineOptions(parallel=ParallelConfig(cfg=2))
TEXT = TextEmbeds(context=torch.zeros(3, 4), negative_context=None)


def make_request(steps: int = 6, prompt: str = "p") -> ResolvedRequest:
    return ResolvedRequest(
        model="test", prompt=prompt, negative_prompt="", image=None, num_frames=1, height=16,
        width=16, steps=steps, guidance_scale=1.0, shift=3.0, sampler="euler", seed=0, fps=8,
        output_type="latent", latents=None, latent_shape=(16, 1, 2, 2))


@pytest.fixture(scope="module")
def stage(ray_session):
    group = WorkerGroup(FakeDiTWorker, 2, gpus_per_worker=0, timeout_s=60)
    try:
        group.start(step_s=STEP_S)
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
    group = WorkerGroup(FakeDiTWorker, 2, gpus_per_worker=0, timeout_s=60)
    try:
        group.start(step_s=STEP_S)
        stage = GroupDenoiseStage(group, OPTIONS)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 asked to fail") as info:
            stage(make_request(prompt="FAIL_RANK1 now"), TEXT, progress=lambda s, t: None)
        assert not isinstance(info.value, WorkerGroupError)  # the rank's own error reaches the caller
        assert time.monotonic() - start < 20
        with pytest.raises(WorkerGroupError, match="out of step"):
            stage.check_health()
    finally:
        group.shutdown()


def test_more_ranks_than_gpus_is_refused_at_once(ray_session):
    """A CUDA group larger than the cluster's GPU count fails at start with the numbers (a
    ValueError from WorkerGroup.start, which the CLI prints as a usage error), instead of waiting
    for workers that can never be placed."""
    options = EngineOptions(device="cuda", parallel=ParallelConfig(cfg=2, ulysses=8))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"needs 16 GPU \(16 ranks x 1\), the Ray cluster has 8; .*wait_for_gpus"):
        GroupDenoiseStage.start("tiny-wan", options, timeout_s=5)
    assert time.monotonic() - start < 3


def test_wait_for_gpus_reaches_the_group(ray_session):
    """`wait_for_gpus` (autoscaling clusters) goes through to the WorkerGroup: the same group is
    not refused at once but waits its timeout for GPUs, then fails with what it asked for."""
    from cluster.worker_group import WorkerGroupError

    options = EngineOptions(device="cuda", parallel=ParallelConfig(cfg=2, ulysses=8))
    start = time.monotonic()
    with pytest.raises(WorkerGroupError, match=r"did not all start within 2 s: each needs 1 GPU"):
        GroupDenoiseStage.start("tiny-wan", options, timeout_s=2, wait_for_gpus=True)
    assert time.monotonic() - start >= 2

"""The DiTGroup replica class driven directly (no Serve) on a 2-rank gloo group of fake workers:
a rank that raises while the other waits in a collective fails the job fast and fails the group,
so Serve's health check replaces the replica instead of the survivor blocking for the
process-group timeout."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cluster import WorkerGroupError
from serving.api import build_request
from serving.deployments import DenoiseProgress, DiTGroup, DiTGroupUnavailable, LatentsRef
from serving.fakes import FAKE_SPEC
from stages.payloads import TextEmbeds

pytestmark = pytest.mark.ray


@pytest.fixture
def dit_group(ray_session):
    group = DiTGroup({
        "model": "fake-wan", "cfg_parallel": 2, "replica_cpus": 0,
        "dit_worker_cls": "serving.fakes:FakeDiTWorker", "dit_worker_kwargs": {"step_s": 0.05},
        "dit": {"progress_poll_s": 0.05},
    })
    yield group
    group.group.shutdown()


def _run(group: DiTGroup, prompt: str, steps: int) -> list:
    request = build_request({"prompt": prompt, "steps": steps}, FAKE_SPEC, ("fake-wan",))
    text = TextEmbeds(context=torch.zeros(8, 4), negative_context=None)

    async def consume() -> list:
        return [event async for event in group.denoise(f"job-{prompt}", request, text, None)]

    return asyncio.run(consume())


def test_group_of_two_denoises(dit_group):
    events = _run(dit_group, "fine", steps=4)
    assert isinstance(events[-1], LatentsRef)
    steps = [e.step for e in events if isinstance(e, DenoiseProgress)]
    assert steps[0] == 0 and steps[-1] == 4 and steps == sorted(steps)
    dit_group.check_health()


def test_rank_error_while_others_wait_in_a_collective_fails_the_group(dit_group):
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 asked to fail") as info:
        _run(dit_group, "FAIL_RANK1 now", steps=4)
    assert not isinstance(info.value, WorkerGroupError)  # the rank's own error reaches the job
    # Within the straggler grace, not the 600 s process-group timeout rank 0 is blocked on.
    assert time.monotonic() - start < 30
    # The group is out of step: the health check fails, so Serve replaces the replica ...
    with pytest.raises(WorkerGroupError, match="out of step"):
        dit_group.check_health()
    # ... and a job that reaches this replica before that is refused unstarted, at once, with
    # the reason (the ingress retries it on a healthy replica).
    start = time.monotonic()
    with pytest.raises(DiTGroupUnavailable, match="out of step"):
        _run(dit_group, "next", steps=2)
    assert time.monotonic() - start < 5


def test_cancel_stops_every_rank_and_the_group_stays_usable(dit_group):
    request = build_request({"prompt": "cancel me", "steps": 400}, FAKE_SPEC, ("fake-wan",))
    text = TextEmbeds(context=torch.zeros(8, 4), negative_context=None)

    async def cancel_after_progress() -> float:
        events: list = []

        async def consume() -> None:
            async for event in dit_group.denoise("job-cancel", request, text, None):
                events.append(event)

        task = asyncio.create_task(consume())
        while not any(isinstance(e, DenoiseProgress) and e.step > 0 for e in events):
            await asyncio.sleep(0.02)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # returns once the ranks stopped (the replica waits for them)
        return time.monotonic() - start

    assert asyncio.run(cancel_after_progress()) < 5  # 400 steps x 0.05 s = 20 s if not stopped
    dit_group.check_health()
    assert isinstance(_run(dit_group, "after cancel", steps=2)[-1], LatentsRef)


def test_a_rank_with_a_broken_device_fails_the_health_check(ray_session):
    """Every rank raises the same error (no one is left in a collective, so the group itself is
    fine), but the device stays broken: the workers' own check_health must fail the replica's,
    or every later job on this replica would fail while Serve thinks it healthy."""
    group = DiTGroup({"model": "fake-wan", "replica_cpus": 0,
                      "dit_worker_cls": "serving.fakes:FakeDiTWorker",
                      "dit": {"progress_poll_s": 0.05}})
    try:
        group.check_health()
        with pytest.raises(Exception, match="fake device error"):
            _run(group, "BREAK_DEVICE now", steps=2)
        with pytest.raises(Exception, match="fake device error"):
            group.check_health()
    finally:
        group.group.shutdown()

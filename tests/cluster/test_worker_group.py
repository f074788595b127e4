"""WorkerGroup mechanics on faked GPUs / CPU (gloo): ranks, rendezvous, calls, liveness, shutdown."""
from __future__ import annotations

import sys
import time

import pytest
import ray
import torch
import torch.distributed as dist

from cluster.worker_group import WorkerGroup, WorkerGroupError, gpu_room

pytestmark = pytest.mark.ray


class EchoWorker:
    """A minimal worker: reports its context and does collectives."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def init_device(self, ctx) -> None:
        self.ctx = ctx

    def info(self) -> dict:
        import os

        return {"rank": self.ctx.rank, "world": self.ctx.world_size, "backend": self.ctx.backend,
                "device": self.ctx.device, "gpu_ids": self.ctx.gpu_ids, "tag": self.tag,
                "dist_rank": dist.get_rank(), "nvls": os.environ.get("NCCL_NVLS_ENABLE"),
                "extra": os.environ.get("LIGHTX2V_TEST_ENV")}

    def all_reduce(self, value: float) -> float:
        t = torch.tensor([value + self.ctx.rank])
        dist.all_reduce(t)
        return float(t.item())

    def collective_after(self, seconds: float) -> float:
        """Rank 0 waits, then everyone all-reduces: a call that is 'in flight' for a while."""
        if self.ctx.rank == 0:
            time.sleep(seconds)
        t = torch.ones(1)
        dist.all_reduce(t)
        return float(t.item())

    def boom(self) -> None:
        raise ValueError("worker raised on purpose")

    def boom_on_rank1_else_collective(self) -> float:
        """Rank 1 fails before a collective the others are already waiting in."""
        if self.ctx.rank == 1:
            raise ValueError("rank 1 failed before the collective")
        return self.collective_after(0.0)


@pytest.fixture(autouse=True)
def _pickle_workers_by_value():
    # Ray workers cannot import this test module by name (pytest importlib mode): ship it by value.
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


def test_group_ranks_rendezvous_calls_shutdown(ray_session):
    group = WorkerGroup(EchoWorker, 3, gpus_per_worker=1, env={"LIGHTX2V_TEST_ENV": "yes"}, timeout_s=60)
    try:
        group.start("t")
        infos = group.get(group.call("info"))
        # ranks in order, one default process group, gloo on (faked) GPUs without CUDA
        assert [i["rank"] for i in infos] == [0, 1, 2] == [i["dist_rank"] for i in infos]
        assert {i["backend"] for i in infos} == {"gloo"} and group.backend == "gloo"
        assert all(i["device"] == "cpu" and i["world"] == 3 and i["tag"] == "t" for i in infos)
        assert all(i["nvls"] == "0" and i["extra"] == "yes" for i in infos)
        # ranks sorted by (node, GPU id); each rank has its own GPU
        gpu_ids = [int(r.gpu_ids[0]) for r in group.ranks]
        assert gpu_ids == sorted(gpu_ids) and len(set(gpu_ids)) == 3
        assert [i["gpu_ids"] for i in infos] == [r.gpu_ids for r in group.ranks]
        # collectives work; errors of a method reach the caller; the group stays healthy
        assert group.get(group.call("all_reduce", 1.0)) == [6.0, 6.0, 6.0]
        # an ObjectRef argument is fetched by each rank (positional and keyword)
        import ray

        assert group.get(group.call("all_reduce", ray.put(2.0))) == [9.0, 9.0, 9.0]
        assert group.get(group.call("all_reduce", value=ray.put(0.0))) == [3.0, 3.0, 3.0]
        assert group.get(group.call_rank(2, "info"))["rank"] == 2
        with pytest.raises(ValueError, match="on purpose"):
            group.get(group.call_rank(0, "boom"))
        group.check_health()
    finally:
        group.shutdown()
    with pytest.raises(WorkerGroupError, match="shut down"):
        group.check_health()
    with pytest.raises(WorkerGroupError, match="shut down"):
        group.call("info")
    group.shutdown()  # twice is fine


def test_cpu_group_and_argument_errors(ray_session):
    with pytest.raises(ValueError, match="world_size"):
        WorkerGroup(EchoWorker, 0)
    with pytest.raises(ValueError, match="backend"):
        WorkerGroup(EchoWorker, 1, backend="mpi")
    with pytest.raises(ValueError, match="nccl"):
        WorkerGroup(EchoWorker, 1, gpus_per_worker=0, backend="nccl")
    with pytest.raises(WorkerGroupError, match="not started"):
        WorkerGroup(EchoWorker, 1).check_health()

    group = WorkerGroup(EchoWorker, 2, gpus_per_worker=0, timeout_s=60)
    with group:
        group.start()
        infos = group.get(group.call("info"))
        assert [i["gpu_ids"] for i in infos] == [(), ()]
        assert group.get(group.call("all_reduce", 0.5)) == [2.0, 2.0]
        # one rank raises while the other waits in a collective: the call fails within the grace
        # period (not at the 60 s process-group timeout) and the out-of-step group is failed
        start = time.monotonic()
        with pytest.raises(ValueError, match="rank 1 failed"):
            group.get(group.call("boom_on_rank1_else_collective"))
        assert time.monotonic() - start < 20
        with pytest.raises(WorkerGroupError, match="out of step"):
            group.check_health()


@pytest.mark.parametrize("world,gpus,message", [
    (2, 100, r"needs 200 GPU \(2 ranks x 100\), the Ray cluster has 8; on an autoscaling cluster, "
             r"start the group with wait_for_gpus=True to wait for nodes$"),
    (9, 1, r"needs 9 GPU \(9 ranks x 1\), the Ray cluster has 8; on an autoscaling"),
    # 5.4 GPU in all, but a 0.6 share is never split over two GPUs: one rank per GPU
    (9, 0.6, r"needs 5.4 GPU \(9 ranks x 0.6\), the Ray cluster has 8, room for 8 ranks of 0.6 GPU"),
])
def test_more_gpus_than_the_cluster_has_is_refused_at_once(ray_session, world, gpus, message):
    """A group the cluster can never place fails start() at once with what it needs and what the
    cluster has (not after the whole timeout), before any actor exists."""
    group = WorkerGroup(EchoWorker, world, gpus_per_worker=gpus, timeout_s=60)
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        group.start()
    assert time.monotonic() - start < 3
    assert group._actors == []
    with pytest.raises(WorkerGroupError, match="not started"):
        group.check_health()


def test_wait_for_gpus_waits_instead_of_refusing(ray_session):
    """On an autoscaling cluster the GPUs may come later: with wait_for_gpus the group is not
    refused at once; it waits its timeout for the nodes and then fails with what was asked and
    what is free, leaving no actor behind."""
    group = WorkerGroup(EchoWorker, 9, gpus_per_worker=1, timeout_s=2, wait_for_gpus=True)
    start = time.monotonic()
    with pytest.raises(WorkerGroupError, match=r"did not all start within 2 s: each needs 1 GPU"):
        group.start()
    assert time.monotonic() - start >= 2
    assert len(group._actors) == 9
    for actor in group._actors:  # killed, not left pending for the autoscaler
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.node_info.remote(), timeout=30)
    with pytest.raises(WorkerGroupError, match="not started"):
        group.check_health()


@pytest.mark.parametrize("total,per_rank,room", [
    (8, 1, 8), (8, 3, 2), (2, 0.6, 2), (1, 0.5, 2), (1, 0.3333, 3), (1, 1 / 3, 3), (1, 0.34, 2),
    (0, 0.5, 0), (2.5, 0.5, 4),
])
def test_gpu_room_counts_fractional_shares_per_gpu(total, per_rank, room):
    assert gpu_room(total, per_rank) == room


def test_workers_that_cannot_be_placed_fail_start_clearly(ray_session):
    """Workers the cluster cannot place for a reason the early refusal does not look at (it counts
    GPUs only; here 100 CPUs each): start() fails after the timeout with what was asked and what
    is free (not a bare GetTimeoutError)."""
    group = WorkerGroup(EchoWorker, 2, gpus_per_worker=0, cpus_per_worker=100, timeout_s=2)
    with pytest.raises(WorkerGroupError,
                       match=r"did not all start within 2 s: each needs 0 GPU and 100 CPU.*free"):
        group.start()
    with pytest.raises(WorkerGroupError, match="not started"):
        group.check_health()


def test_dead_rank_fails_call_in_flight_and_health(ray_session):
    import ray

    group = WorkerGroup(EchoWorker, 2, gpus_per_worker=0, timeout_s=60)
    group.start()
    try:
        refs = group.call("collective_after", 30.0)   # rank 1 waits in all_reduce for rank 0
        time.sleep(0.5)
        ray.kill(group._actors[1])                     # a rank dies mid-call
        start = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"rank 1 .* died"):
            group.get(refs)
        assert time.monotonic() - start < 10, "the call in flight must fail fast, not at the timeout"
        with pytest.raises(WorkerGroupError, match="rank 1"):
            group.check_health()
        with pytest.raises(WorkerGroupError):
            group.call("info")
    finally:
        group.shutdown()


def test_placement_group_bundles(ray_session):
    """Inside a placement group (as a Serve replica with GPU bundles), each worker takes a GPU bundle."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.01}] + [{"GPU": 1, "CPU": 0.01}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)

    @ray.remote(num_cpus=0.01)
    def driver() -> list:
        group = WorkerGroup(EchoWorker, 2, gpus_per_worker=1, timeout_s=60)
        group.start()
        try:
            return [r.gpu_ids for r in group.ranks] + [group.get(group.call("all_reduce", 0.0))]
        finally:
            group.shutdown()

    try:
        out = ray.get(driver.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(),
            timeout=120)
        gpu_ids, sums = out[:2], out[2]
        assert sums == [1.0, 1.0]
        assert all(len(g) == 1 for g in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    finally:
        remove_placement_group(pg)

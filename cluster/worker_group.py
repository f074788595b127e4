"""A group of Ray worker actors that form one torch.distributed process group.

The pattern is the one Ray Serve LLM uses for vLLM (notes/ray-serve.md, "Multi-GPU replicas"):

1. ``start()`` creates ``world_size`` actors, each with ``gpus_per_worker`` GPUs (fractional
   allowed; 0 for CPU-only groups), inside the caller's placement group when there is one
   (a Serve replica with ``placement_group_bundles``), one GPU bundle each. Outside a placement
   group, a group that needs more GPUs than the cluster has is refused before any actor is made
   (unless ``wait_for_gpus``: on an autoscaling cluster, wait up to ``timeout_s`` for nodes).
2. Each actor reports its node IP and GPU ids; ranks are assigned by sorting on (node IP, GPU id),
   because Ray hands out GPU ids unordered.
3. Rank 0 opens a ``TCPStore`` on a port the OS picks (never a fixed port); every rank joins the
   process group through it: NCCL on GPUs, gloo on CPU, with a timeout so the survivors of a dead
   rank fail instead of hanging. Each worker picks its device explicitly.
4. The user's worker class is built on every rank and its ``init_device(ctx)`` is called with a
   ``WorkerContext`` (rank, world size, device, backend).
5. Every actor runs a long ``sentinel()`` call; a monitor thread ``ray.wait``s on them. When one
   returns (its actor died), the group is marked failed, the other actors are killed so calls in
   flight fail at once, and ``check_health()`` raises from then on. A broken group is not
   repaired: make a new one (Serve does so by replacing the replica).

Actors are threaded (``max_concurrency``), so ``cancel``/``progress`` calls reach a worker while
its long ``denoise`` call runs.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

WORKER_ENV: dict[str, str] = {
    # NVLink multicast (NVLS) must stay off on the lent machines (notes/ray-serve.md).
    "NCCL_NVLS_ENABLE": "0",
    # Abort a rank whose NCCL collective timed out or failed instead of leaving it blocked.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
"""Environment every worker process starts with (``env=`` entries are added on top)."""

_MONITOR_POLL_S = 0.5
_LIVE_GROUPS: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()
"""Started groups not shut down yet; `_shutdown_at_exit` stops them when the interpreter exits."""


def _shutdown_at_exit() -> None:
    """Shut down the groups a script left running (no ``close()``). Registered after ``import
    ray``, so it runs before Ray's own atexit ``ray.shutdown()``: a monitor thread still inside
    ``ray.wait`` while the core worker is torn down can crash the interpreter at exit (exit 139;
    ray-project/ray issues 31145 and 47864)."""
    for group in list(_LIVE_GROUPS):
        try:
            group.shutdown(timeout_s=5.0)
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


atexit.register(_shutdown_at_exit)
STRAGGLER_GRACE_S = 5.0
"""How long the other ranks of a call may keep running after one rank raised (see ``get``)."""


class WorkerGroupError(RuntimeError):
    """A worker of the group died or the group is not usable (not started, shut down)."""


@dataclass(frozen=True)
class WorkerContext:
    """What a worker learns about its place in the group (passed to ``init_device``)."""

    rank: int
    world_size: int
    backend: str
    """torch.distributed backend of the group's default process group: "nccl" or "gloo"."""
    device: str
    """The device this rank computes on: "cuda:<local index>" or "cpu"."""
    node_ip: str
    gpu_ids: tuple[str, ...]


@dataclass(frozen=True)
class RankInfo:
    """Where one rank of the group lives."""

    rank: int
    node_ip: str
    gpu_ids: tuple[str, ...]
    pid: int

    def describe(self) -> str:
        gpus = ",".join(self.gpu_ids) if self.gpu_ids else "none"
        return f"rank {self.rank} (node {self.node_ip}, GPU {gpus}, pid {self.pid})"


def _gpu_sort_key(gpu_ids: tuple[str, ...]) -> tuple:
    """Numeric GPU ids sort as numbers ("10" after "9"); others as strings."""
    return tuple((0, int(g), "") if g.isdigit() else (1, 0, g) for g in gpu_ids)


class _GroupMember:
    """The Ray actor on one rank: group plumbing around an instance of the user's worker class."""

    def __init__(self, env: dict[str, str]) -> None:
        os.environ.update(env)  # also in runtime_env; repeated here for workers reused by Ray
        self._stopped = threading.Event()
        self._store = None
        self._worker: Any = None

    # -- start-up ---------------------------------------------------------------------------
    def node_info(self) -> dict:
        """Node IP, GPU ids Ray assigned to this actor, pid, and whether CUDA is usable here."""
        import torch

        ctx = ray.get_runtime_context()
        gpu_ids = tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", []))
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": gpu_ids,
            "pid": os.getpid(),
            "cuda": torch.cuda.is_available(),
        }

    def open_store(self, world_size: int, timeout_s: float) -> int:
        """Rank 0 only: open the rendezvous store on a port the OS picks; returns the port."""
        import torch.distributed as dist

        self._store = dist.TCPStore(
            "0.0.0.0", 0, world_size, True,
            timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
        )
        return int(self._store.port)

    def init_process_group(self, rank: int, world_size: int, master_addr: str, port: int,
                           backend: str, timeout_s: float, gpu_ids: tuple[str, ...]) -> str:
        """Pick the device, join the default process group, return the device string."""
        import torch
        import torch.distributed as dist

        device = _pick_device(backend, gpu_ids)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self._store if rank == 0 else dist.TCPStore(
            master_addr, port, world_size, False, timeout=timeout)
        self._store = store
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        return str(device)

    def build_worker(self, worker_cls: type, args: tuple, kwargs: dict, ctx: WorkerContext) -> None:
        """Build the user's worker and give it its context (``init_device``)."""
        self._worker = worker_cls(*args, **kwargs)
        init_device = getattr(self._worker, "init_device", None)
        if init_device is not None:
            init_device(ctx)

    # -- running ----------------------------------------------------------------------------
    def execute(self, method: str, packed: tuple[tuple, dict]) -> Any:
        """Run ``worker.<method>(*args, **kwargs)`` on this rank. Arguments that are ObjectRefs
        are fetched here, straight from the object store."""
        if self._worker is None:
            raise WorkerGroupError("worker not built yet: call WorkerGroup.start() first")
        args, kwargs = packed
        args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
        return getattr(self._worker, method)(*args, **kwargs)

    def sentinel(self) -> str:
        """Returns only when the group shuts down; if the actor dies, the ref fails instead."""
        self._stopped.wait()
        return "stopped"

    def stop(self) -> None:
        """Clean shutdown of this rank: the worker's ``shutdown()``, then the process group."""
        try:
            if self._worker is not None and hasattr(self._worker, "shutdown"):
                self._worker.shutdown()
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._stopped.set()


_RemoteMember = ray.remote(_GroupMember)


def _pick_device(backend: str, gpu_ids: tuple[str, ...]):
    """The device for this rank, chosen explicitly (never "whatever cuda:0 happens to be")."""
    import torch

    if backend != "nccl":
        return torch.device("cpu")
    if not gpu_ids:
        raise WorkerGroupError("backend 'nccl' needs GPUs: give the group gpus_per_worker > 0")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        # Ray narrowed the visible devices to this actor's GPUs: index within that list.
        ids = [v.strip() for v in visible.split(",")]
        index = ids.index(gpu_ids[0]) if gpu_ids[0] in ids else 0
    else:
        # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: all GPUs visible, use Ray's id.
        index = int(gpu_ids[0])
    return torch.device("cuda", index)


def gpu_room(total_gpus: float, per_rank: float) -> int:
    """How many ranks of ``per_rank`` GPUs (> 0) fit on ``total_gpus`` GPUs. Ray never splits a
    fraction of a GPU over two GPUs, so each GPU holds floor(1 / per_rank) fractional ranks. For
    GPUs spread over several nodes this is an upper bound (a rank of 2 GPUs needs one node's)."""
    eps = 1e-6  # 3 x 0.3333 fits one GPU (Ray rounds shares to 1e-4)
    if per_rank < 1:
        return math.floor(total_gpus + eps) * math.floor(1 / per_rank + eps)
    return math.floor(total_gpus / per_rank + eps)


class WorkerGroup:
    """N Ray actors running ``worker_cls``, one process group; see the module docstring.

    ``gpus_per_worker``: Ray GPUs per actor (fractional allowed; 0 for a CPU group over gloo).
    ``backend``: None picks NCCL when every worker sees a CUDA GPU, else gloo.
    ``env``: extra environment for the worker processes (on top of ``WORKER_ENV``).
    ``timeout_s``: start-up calls and the process-group collectives time out after this.
    ``cpus_per_worker``: Ray CPUs per actor (0, as vLLM's workers: the GPU bundle's CPU stays free).
    ``max_concurrency``: threads per actor, so cancel/progress reach a rank during a long call.
    ``wait_for_gpus``: do not refuse a group larger than the cluster's GPUs at start; wait up to
    ``timeout_s`` for them instead (an autoscaling cluster adds nodes when asked).
    """

    def __init__(self, worker_cls: type, world_size: int, *, gpus_per_worker: float = 1.0,
                 backend: str | None = None, env: dict[str, str] | None = None,
                 timeout_s: float = 600, cpus_per_worker: float = 0.0,
                 max_concurrency: int = 8, wait_for_gpus: bool = False) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
        if backend not in (None, "nccl", "gloo"):
            raise ValueError(f"backend must be None (automatic), 'nccl' or 'gloo'; got {backend!r}")
        if backend == "nccl" and gpus_per_worker == 0:
            raise ValueError("backend 'nccl' needs gpus_per_worker > 0")
        self.worker_cls = worker_cls
        self.world_size = world_size
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.requested_backend = backend
        self.env = {**WORKER_ENV, **(env or {})}
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.wait_for_gpus = wait_for_gpus

        self.backend: str | None = None
        self.ranks: list[RankInfo] = []
        self._actors: list[ray.actor.ActorHandle] = []   # index == rank
        self._sentinels: list[ray.ObjectRef] = []
        self._failure: str | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self.on_failure: Callable[[str], None] | None = None
        """Optional callback run (in the monitor thread) with the reason when a rank dies."""

    # -- start-up ---------------------------------------------------------------------------
    def start(self, *init_args: Any, **init_kwargs: Any) -> None:
        """Create the actors, sort ranks, rendezvous, build ``worker_cls(*init_args, **init_kwargs)``
        on every rank and call its ``init_device(ctx)``. Raises on any failure (nothing left running):
        a ``ValueError`` at once, before any actor exists, when the cluster has too few GPUs for the
        group; a ``WorkerGroupError`` when the workers do not start within ``timeout_s``."""
        if self._actors:
            raise WorkerGroupError("this WorkerGroup was already started; make a new one")
        # (Asking for the placement group connects Ray, as the first `.remote()` would.)
        if ray.util.get_current_placement_group() is None and not self.wait_for_gpus:
            self._check_cluster_gpus()  # in a placement group, _bundle_index checks the bundles
        try:
            self._start(init_args, init_kwargs)
        except BaseException:
            self._kill_all()
            raise

    def _start(self, init_args: tuple, init_kwargs: dict) -> None:
        self._actors = actors = []
        for i in range(self.world_size):
            actors.append(self._make_actor(i))  # in self._actors at once: a failure kills them
        try:
            infos = ray.get([a.node_info.remote() for a in actors], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerGroupError(
                f"the {self.world_size} workers did not all start within {self.timeout_s:g} s: each "
                f"needs {self.gpus_per_worker:g} GPU and {self.cpus_per_worker:g} CPU"
                + (" in a bundle of the caller's placement group"
                   if ray.util.get_current_placement_group() is not None else "")
                + f"; the cluster has {ray.available_resources()} free") from None

        # 1. Ranks sorted by (node IP, GPU id); creation order breaks ties.
        order = sorted(range(len(actors)),
                       key=lambda i: (infos[i]["node_ip"], _gpu_sort_key(infos[i]["gpu_ids"]), i))
        self._actors = [actors[i] for i in order]
        infos = [infos[i] for i in order]
        self.ranks = [RankInfo(r, info["node_ip"], tuple(info["gpu_ids"]), info["pid"])
                      for r, info in enumerate(infos)]

        # 2. Backend: NCCL when every worker has a GPU it can use, gloo otherwise.
        self.backend = self._choose_backend(infos)
        if self.backend == "nccl":
            seats = [(r.node_ip, r.gpu_ids[0]) for r in self.ranks]
            if len(set(seats)) < len(seats):
                raise WorkerGroupError(
                    f"NCCL cannot put two ranks on one GPU, but gpus_per_worker={self.gpus_per_worker} "
                    f"placed ranks on {seats}; give each worker a whole GPU")

        # 3. Rendezvous: rank 0 opens the store on a free port; everyone joins.
        port = ray.get(self._actors[0].open_store.remote(self.world_size, self.timeout_s),
                       timeout=self.timeout_s)
        master = self.ranks[0].node_ip
        devices = ray.get([
            a.init_process_group.remote(r, self.world_size, master, port, self.backend,
                                        self.timeout_s, self.ranks[r].gpu_ids)
            for r, a in enumerate(self._actors)], timeout=self.timeout_s)

        # 4. The user's worker on every rank, with its context.
        ray.get([
            a.build_worker.remote(self.worker_cls, init_args, init_kwargs, WorkerContext(
                rank=r, world_size=self.world_size, backend=self.backend, device=devices[r],
                node_ip=self.ranks[r].node_ip, gpu_ids=self.ranks[r].gpu_ids))
            for r, a in enumerate(self._actors)], timeout=self.timeout_s)

        # 5. Liveness: one sentinel call per rank, watched by a monitor thread.
        self._sentinels = [a.sentinel.remote() for a in self._actors]
        self._monitor = threading.Thread(target=self._watch, name="worker-group-monitor",
                                         daemon=True)
        self._monitor.start()
        _LIVE_GROUPS.add(self)
        log.info("worker group started: %s, backend %s",
                 "; ".join(r.describe() for r in self.ranks), self.backend)

    def _check_cluster_gpus(self) -> None:
        """Refuse a group that the cluster can never place (more GPUs than it has) instead of
        waiting ``timeout_s`` for actors that never start. Counts the cluster's GPUs, not the free
        ones: GPUs in use may be freed meanwhile (the start-up timeout covers that case)."""
        per_rank = self.gpus_per_worker
        if per_rank == 0:
            return  # a CPU group (gloo)
        total = ray.cluster_resources().get("GPU", 0)
        room = gpu_room(total, per_rank)
        if room >= self.world_size:
            return
        need = self.world_size * per_rank
        raise ValueError(
            f"the worker group needs {need:g} GPU ({self.world_size} ranks x {per_rank:g}), the Ray "
            f"cluster has {total:g}"
            + (f", room for {room} ranks of {per_rank:g} GPU (a rank's share of a GPU is never "
               "split over two GPUs)" if need <= total else "")
            + "; on an autoscaling cluster, start the group with wait_for_gpus=True to wait for nodes")

    def _make_actor(self, index: int) -> ray.actor.ActorHandle:
        options: dict[str, Any] = dict(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
            max_concurrency=self.max_concurrency, max_restarts=0,
            runtime_env={"env_vars": dict(self.env)},
        )
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=self._bundle_index(pg, index),
                placement_group_capture_child_tasks=True)
        return _RemoteMember.options(**options).remote(self.env)

    def _bundle_index(self, pg, index: int) -> int:
        """GPU workers take one GPU bundle each (in bundle order); CPU workers go anywhere."""
        if self.gpus_per_worker == 0:
            return -1
        gpu_bundles = [i for i, b in enumerate(pg.bundle_specs)
                       if b.get("GPU", 0) >= self.gpus_per_worker]
        if len(gpu_bundles) < self.world_size:
            raise WorkerGroupError(
                f"the placement group has {len(gpu_bundles)} bundles with >= "
                f"{self.gpus_per_worker} GPU, the group needs {self.world_size} "
                f"(bundles: {pg.bundle_specs})")
        return gpu_bundles[index]

    def _choose_backend(self, infos: list[dict]) -> str:
        usable = self.gpus_per_worker > 0 and all(i["cuda"] and i["gpu_ids"] for i in infos)
        if self.requested_backend == "nccl" and not usable:
            raise WorkerGroupError(
                "backend 'nccl' asked for, but not every worker sees a CUDA GPU "
                f"(workers: {[(i['node_ip'], i['gpu_ids'], i['cuda']) for i in infos]})")
        if self.requested_backend is not None:
            return self.requested_backend
        return "nccl" if usable else "gloo"

    # -- running ----------------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Run ``worker.<method>(*args, **kwargs)`` on every rank; refs in rank order.

        The arguments are put in the object store once for all ranks; an argument that is an
        ObjectRef (e.g. an upstream stage's output) is fetched by each rank itself."""
        self._require_usable()
        packed = ray.put((args, kwargs)) if len(self._actors) > 1 else (args, kwargs)
        return [a.execute.remote(method, packed) for a in self._actors]

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Run ``worker.<method>`` on one rank only (e.g. ``progress`` on rank 0)."""
        self._require_usable()
        return self._actors[rank].execute.remote(method, (args, kwargs))

    def get(self, refs: list[ray.ObjectRef] | ray.ObjectRef, timeout: float | None = None) -> Any:
        """``ray.get`` that turns a dead rank into a ``WorkerGroupError`` naming it.

        For the refs of one ``call`` (a list): when a rank raised while others are still running
        after ``STRAGGLER_GRACE_S``, those are stuck in a collective the failed rank never joins;
        the group is failed (``fail``) so they stop now instead of at the process-group timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if isinstance(refs, list) and len(refs) > 1:
            cause = self._wait_in_step(refs, timeout)
            if cause is not None:
                raise cause  # the error of the rank that left the step first
        try:
            return ray.get(refs, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except ray.exceptions.RayActorError as err:
            time.sleep(_MONITOR_POLL_S)  # let the monitor record which rank died first
            raise WorkerGroupError(self._failure or f"a worker of the group died: {err}") from err

    async def aget(self, refs: list[ray.ObjectRef] | ray.ObjectRef, timeout: float | None = None) -> Any:
        """``get`` for async callers (a Serve replica): the same dead-rank and out-of-step
        handling, waited for in a thread so the event loop stays free."""
        import asyncio

        return await asyncio.to_thread(self.get, refs, timeout)

    def _wait_in_step(self, refs: list[ray.ObjectRef], timeout: float | None) -> Exception | None:
        """Wait for all refs; the first rank's error if the others stayed stuck (group failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failed_at: float | None = None
        checked: set[ray.ObjectRef] = set()
        while True:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=_MONITOR_POLL_S)
            if not pending or (deadline is not None and time.monotonic() > deadline):
                return None  # the caller's ray.get raises the error / times out
            for ref in ready:
                if ref in checked:
                    continue
                checked.add(ref)
                try:
                    ray.get(ref, timeout=0)
                except Exception as err:  # noqa: BLE001 - any error: this rank left the step
                    if failed_at is None:
                        failed_at, rank, cause = time.monotonic(), refs.index(ref), err
            if failed_at is not None and time.monotonic() - failed_at > STRAGGLER_GRACE_S:
                first_line = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
                self.fail(f"worker group failed: {self.ranks[rank].describe()} raised "
                          f"{type(cause).__name__} ({first_line}) while {len(pending)} other rank(s) "
                          "kept running; the ranks are out of step, start a new group")
                return cause

    def fail(self, reason: str) -> None:
        """Mark the group failed and kill its workers (calls in flight fail at once)."""
        with self._lock:
            if self._failure is not None or self._closing.is_set():
                return
            self._failure = reason
            log.error(reason)
        self._kill_all()
        if self.on_failure is not None:
            self.on_failure(reason)

    def check_health(self) -> None:
        """Raise ``WorkerGroupError`` when the group is not running or any rank has died."""
        self._require_usable()
        ready, _ = ray.wait(self._sentinels, num_returns=1, timeout=0)
        if ready:
            self._record_failure(ready[0])
            raise WorkerGroupError(self._failure or "the worker group was shut down")

    def _require_usable(self) -> None:
        if self._failure is not None:
            raise WorkerGroupError(self._failure)
        if self._closing.is_set():
            raise WorkerGroupError("the worker group was shut down")
        if not self._actors or not self._sentinels:
            raise WorkerGroupError("the worker group is not started: call start() first")

    # -- liveness ---------------------------------------------------------------------------
    def _watch(self) -> None:
        """Monitor thread: wait until a sentinel finishes; a finish before shutdown is a death."""
        pending = list(self._sentinels)
        while pending and not self._closing.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=_MONITOR_POLL_S)
            if ready and not self._closing.is_set():
                self._record_failure(ready[0])
                return

    def _record_failure(self, sentinel: ray.ObjectRef) -> None:
        with self._lock:
            if self._failure is not None or self._closing.is_set():
                return
            rank = self._sentinels.index(sentinel)
            try:
                ray.get(sentinel, timeout=0)
                cause = "its actor stopped"
            except Exception as err:  # noqa: BLE001 - any error means the rank is gone
                cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        # The survivors' process group is broken: kill them (fail) so calls in flight fail now
        # rather than at the collective timeout.
        self.fail(f"worker group failed: {self.ranks[rank].describe()} died ({cause}); "
                  "the group cannot continue, start a new one")

    @property
    def failure(self) -> str | None:
        """Why the group failed, or None while it is healthy."""
        return self._failure

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every rank cleanly (worker ``shutdown()``, process group destroyed), then kill
        the actors. Safe to call twice and after a failure."""
        if self._closing.is_set():
            return
        self._closing.set()
        _LIVE_GROUPS.discard(self)
        if self._failure is None and self._actors:
            try:
                ray.get([a.stop.remote() for a in self._actors], timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - we kill them anyway
                log.warning("worker group: clean stop failed (%s); killing the actors", err)
        self._kill_all()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)

    def _kill_all(self) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


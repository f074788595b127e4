"""Ray Core glue (no Serve): the DiT worker group and its workers."""
from cluster.worker_group import RankInfo, WorkerContext, WorkerGroup, WorkerGroupError

__all__ = ["RankInfo", "WorkerContext", "WorkerGroup", "WorkerGroupError", "DiTWorker"]


def __getattr__(name: str):
    # DiTWorker pulls in stages/engine (torch models); import it only when asked for.
    if name == "DiTWorker":
        from cluster.dit_worker import DiTWorker
        return DiTWorker
    raise AttributeError(name)

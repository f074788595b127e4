"""Prometheus metrics of the service, recorded through Ray's metrics API (`ray.util.metrics`).

Ray exports them with every node's other metrics (the Prometheus endpoint of the node's metrics
agent, port `metrics_export_port`), prefixed `ray_`: `lightx2v_stage_seconds` is scraped as
`ray_lightx2v_stage_seconds`. Ray adds its own tags (node, session); ours are listed below.
Serve's own metrics complete them: `ray_serve_deployment_queued_queries` (requests waiting in
front of a deployment), `ray_serve_replica_processing_queries`, `ray_serve_num_http_requests`,
`ray_serve_num_http_error_requests`, replica health. The Grafana dashboard in
`deploy/grafana-lightx2v.json` plots both. The table (`METRICS`) is the documentation.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Iterator

from ray.util import metrics as ray_metrics

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]

METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (type, tags, meaning)
    "lightx2v_jobs_submitted_total": ("counter", ("model",), "jobs accepted by the ingress"),
    "lightx2v_jobs_finished_total": ("counter", ("model", "status", "reason"),
                                     "jobs that ended: status completed/failed/cancelled, reason the error code"),
    "lightx2v_job_seconds": ("histogram", ("model", "status"), "job time, submit to end"),
    "lightx2v_jobs": ("gauge", ("state",), "jobs of this ingress replica now: state queued / in_progress"),
    "lightx2v_queue_depth": ("gauge", ("stage",),
                             "calls waiting inside a replica: ingress jobs not yet at the DiT (stage ingress), "
                             "jobs waiting for the DiT worker group (stage denoise)"),
    "lightx2v_running": ("gauge", ("stage",), "calls running in a replica now, per stage"),
    "lightx2v_stage_seconds": ("histogram", ("stage",),
                               "time of one stage call: text_encode, image_encode, denoise, decode"),
    "lightx2v_denoise_step_seconds": ("histogram", (), "time of one denoising step (all ranks)"),
    "lightx2v_stage_failures_total": ("counter", ("stage", "reason"),
                                      "stage calls that raised, reason the exception type"),
    "lightx2v_orphaned_jobs_total": ("counter", (),
                                     "DiT jobs stopped or never started because their ingress replica died"),
    "lightx2v_http_errors_total": ("counter", ("status", "code"), "error answers of the HTTP API"),
    "lightx2v_gpu_memory_bytes": ("gauge", ("stage", "rank", "kind"),
                                  "GPU memory of a stage's process: kind allocated / peak (since start)"),
}
"""Every metric: name -> (type, tag keys, meaning)."""


@functools.lru_cache(maxsize=None)
def metric(name: str):
    """The process's one instance of metric `name` (declared in `METRICS`)."""
    kind, tags, description = METRICS[name]
    if kind == "counter":
        return ray_metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "gauge":
        return ray_metrics.Gauge(name, description=description, tag_keys=tags)
    return ray_metrics.Histogram(name, description=description, boundaries=SECONDS, tag_keys=tags)


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    metric(name).inc(value, tags=_tags(tags))


def set_gauge(name: str, value: float, **tags: str) -> None:
    metric(name).set(value, tags=_tags(tags))


def observe(name: str, value: float, **tags: str) -> None:
    metric(name).observe(value, tags=_tags(tags))


def _tags(tags: dict[str, object]) -> dict[str, str] | None:
    return {k: str(v) for k, v in tags.items()} or None


class StageMeter:
    """What one stage replica records around its calls: running count, time, failures, GPU
    memory (CUDA processes only)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.running = 0

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        self.running += 1
        set_gauge("lightx2v_running", self.running, stage=self.stage)
        start = time.perf_counter()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            raise  # cancelled (a DELETE, a closed stream): not a failure
        except BaseException as err:
            inc("lightx2v_stage_failures_total", stage=self.stage, reason=type(err).__name__)
            raise
        else:
            observe("lightx2v_stage_seconds", time.perf_counter() - start, stage=self.stage)
        finally:
            self.running -= 1
            set_gauge("lightx2v_running", self.running, stage=self.stage)
            record_gpu_memory(self.stage)


def record_gpu_memory(stage: str, rank: int = 0, allocated: int | None = None,
                      peak: int | None = None) -> None:
    """GPU memory of this process (or the given values, e.g. a DiT rank's report)."""
    if allocated is None:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    set_gauge("lightx2v_gpu_memory_bytes", allocated, stage=stage, rank=rank, kind="allocated")
    if peak is not None:
        set_gauge("lightx2v_gpu_memory_bytes", peak, stage=stage, rank=rank, kind="peak")

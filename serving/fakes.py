"""Fake stages and a fake DiT worker with the real interfaces, for tests of the serving logic
(overlap timing, back-pressure, cancellation) without models.

Inject them through `AppArgs`: `engine_cls="serving.fakes:FakeStageEngine"` with
`engine_kwargs={"text_s", "image_s", "decode_s", "timeline"}`, and
`dit_worker_cls="serving.fakes:FakeDiTWorker"` with `dit_worker_kwargs={"step_s", "timeline"}`.
Every stage call appends one JSON line `{"stage", "prompt", "start", "end", "pid"}` to that file
(wall-clock seconds), so a test can see which stages overlapped; the DiT worker also writes a
`denoise_start` line when a job starts. A prompt starting with `FAIL_DECODE` makes the decoder
raise, one starting with `FAIL_RANK1` makes rank 1 of the DiT group raise at its first step while
the other ranks wait in that step's collective, one starting with `BREAK_DEVICE` makes every
rank's device "broken": that job and every later one raise, and so does `check_health`, as after
a sticky CUDA error (error paths).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import torch

from engine.options import EngineOptions
from engine.registry import ModelSpec, SamplingDefaults
from stages.payloads import EncodedVideo, ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

FAKE_SPEC = ModelSpec(
    name="fake-wan", family="fake", tasks=frozenset({"t2v", "i2v"}),
    defaults=SamplingDefaults(num_frames=5, height=32, width=32, steps=4, guidance_scale=1.0,
                              shift=3.0, sampler="euler", fps=8),
    description="fake stages for serving tests (no model)",
)


def _record(timeline: str | None, stage: str, request: ResolvedRequest, start: float) -> None:
    if timeline:
        line = json.dumps({"stage": stage, "prompt": request.prompt, "start": start,
                           "end": time.time(), "pid": os.getpid()})
        with open(timeline, "a") as f:  # one short append per call: atomic enough for tests
            f.write(line + "\n")


class _FakeStage:
    def __init__(self, name: str, delay_s: float, timeline: str | None, fn) -> None:
        self.name, self.delay_s, self.timeline, self.fn = name, delay_s, timeline, fn

    def __call__(self, request: ResolvedRequest, *inputs: Any) -> Any:
        start = time.time()
        time.sleep(self.delay_s)
        out = self.fn(request, *inputs)
        _record(self.timeline, self.name, request, start)
        return out


class FakeStageEngine:
    """`StageEngine` with sleeping stages that return payloads of the right types."""

    def __init__(self, model: str, options: EngineOptions, *, text_s: float = 0.0,
                 image_s: float = 0.0, decode_s: float = 0.0, timeline: str | None = None) -> None:
        self.delays = {"text": text_s, "image": image_s, "decode": decode_s}
        self.timeline = timeline

    @classmethod
    def resolve(cls, model: str) -> ModelSpec:
        return FAKE_SPEC

    def text_stage(self):
        return _FakeStage("text_encode", self.delays["text"], self.timeline,
                          lambda r: TextEmbeds(context=torch.zeros(8, 4), negative_context=None))

    def image_stage(self):
        return _FakeStage("image_encode", self.delays["image"], self.timeline,
                          lambda r: ImageCond(clip_tokens=None,
                                              latent_cond=torch.zeros(20, *r.latent_shape[1:])))

    def decode_stage(self):
        def decode(r: ResolvedRequest, latents: Latents) -> EncodedVideo:
            if r.prompt.startswith("FAIL_DECODE"):
                raise RuntimeError(f"fake decoder asked to fail for {r.prompt!r}")
            return EncodedVideo(data=b"FAKE-MP4 " + r.prompt.encode(), num_frames=r.num_frames,
                                height=r.height, width=r.width, fps=r.fps)
        return _FakeStage("decode", self.delays["decode"], self.timeline, decode)


class FakeDiTWorker:
    """The DiT worker interface (cluster.DiTWorker) with a sleeping denoise loop. In a group of
    several ranks every step is a real collective (the agreed cancel flag, all-reduced over the
    group's process group, as cluster.DiTWorker does). Unlike DiTWorker it does not serialize
    `denoise` calls itself: `stats()` counts them and the most that ran at once on this rank, so
    a test can check that its caller runs one at a time."""

    def __init__(self, *, step_s: float = 0.0, timeline: str | None = None) -> None:
        self.step_s = step_s
        self.timeline = timeline
        self._progress: dict[str, dict] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._calls = self._active = self._max_active = 0
        self.rank, self.world_size = 0, 1
        self.broken: str | None = None

    def init_device(self, ctx) -> None:
        self.rank, self.world_size = ctx.rank, ctx.world_size

    def load_model(self, checkpoint: str, options: EngineOptions) -> None:
        pass

    def warm_up(self) -> float:
        return 0.0

    def denoise(self, request: ResolvedRequest, text: TextEmbeds, image: ImageCond | None,
                job_id: str) -> Latents | None:
        from stages.base import Cancelled

        start = time.time()
        with self._lock:
            self._calls += 1
            self._active += 1
            self._max_active = max(self._max_active, self._active)
        _record(self.timeline, "denoise_start", request, start)
        try:
            if request.prompt.startswith("BREAK_DEVICE"):
                self.broken = f"fake device error (broken by {request.prompt!r})"
            if self.broken is not None:
                raise RuntimeError(self.broken)
            for step in range(request.steps):
                if self.rank == 1 and request.prompt.startswith("FAIL_RANK1"):
                    raise RuntimeError(f"fake DiT worker rank 1 asked to fail for {request.prompt!r}")
                if self._agreed_cancel(job_id):
                    _record(self.timeline, "denoise_cancelled", request, start)
                    raise Cancelled(f"job {job_id} cancelled before step {step + 1}")
                time.sleep(self.step_s)
                with self._lock:
                    self._progress[job_id] = {"step": step + 1, "total": request.steps}
        finally:
            with self._lock:
                self._progress.pop(job_id, None)
                self._active -= 1
        if self.rank == 0:
            _record(self.timeline, "denoise", request, start)
            return Latents(latents=torch.zeros(request.latent_shape))
        return None

    def _agreed_cancel(self, job_id: str) -> bool:
        with self._lock:
            flag = job_id in self._cancelled
            self._cancelled.discard(job_id)
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the others wait here for a rank that raised
        return bool(t.item() > 0)

    def progress(self, job_id: str) -> dict | None:
        with self._lock:
            entry = self._progress.get(job_id)
        return None if entry is None else dict(entry)

    def stats(self) -> dict:
        """{"calls": denoise calls so far, "max_active": the most that ran at once} on this rank."""
        with self._lock:
            return {"calls": self._calls, "max_active": self._max_active}

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def check_health(self) -> None:
        if self.broken is not None:
            raise RuntimeError(self.broken)

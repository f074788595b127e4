"""Fake stages and a fake DiT worker with the real interfaces, for tests of the serving logic
(overlap timing, back-pressure, cancellation) without models.

Inject them through `AppArgs`: `engine_cls="serving.fakes:FakeStageEngine"` with
`engine_kwargs={"text_s", "image_s", "decode_s", "timeline"}`, and
`dit_worker_cls="serving.fakes:FakeDiTWorker"` with `dit_worker_kwargs={"step_s", "timeline"}`.
Every stage call appends one JSON line `{"stage", "prompt", "start", "end", "pid", "image"}` to
that file (wall-clock seconds; `image`: whether the request that stage got carried the image),
so a test can see which stages overlapped and what each was sent; the DiT worker also writes a
`denoise_start` line when a job starts. A prompt starting with `FAIL_DECODE` makes the decoder
raise, one starting with `FAIL_RANK1` makes rank 1 of the DiT group raise at its first step while
the other ranks wait in that step's collective, one starting with `BREAK_DEVICE` makes every
rank's device "broken": that job and every later one raise, and so does `check_health`, as after
a sticky CUDA error (error paths).

`local_graph()` gives the ingress in-process stand-ins for the four deployment handles (the
same fake stages, no Ray), for fast tests of the HTTP layer (auth, limits, error shapes, fuzz).
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any, AsyncIterator

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
                           "end": time.time(), "pid": os.getpid(),
                           "image": getattr(request, "image", None) is not None})
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


# ----------------------------------------------------------------------------- in-process graph


class _LocalResponse:
    """Stands in for a `DeploymentResponse`: awaitable (once or more), cancellable."""

    def __init__(self, coro) -> None:
        self._task = asyncio.ensure_future(coro)

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


class _LocalStream:
    """Stands in for a streaming `DeploymentResponseGenerator`."""

    def __init__(self, agen: AsyncIterator) -> None:
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._agen.aclose())


class LocalHandle:
    """`handle.method.remote(...)` / `handle.options(stream=True).method.remote(...)` on a
    plain object whose methods are coroutines or async generators (a deployment handle without
    Ray, for tests that drive the ingress in process)."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self._target, self._stream = target, stream

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str):
        method = getattr(self._target, name)
        stream = self._stream

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any):
                return _LocalStream(method(*args, **kwargs)) if stream else _LocalResponse(method(*args, **kwargs))

        return _Method


class LocalGraph:
    """The four stages in this process on the fake stages; `calls` lists (stage, prompt,
    had_image) for every call, so tests see what each stage was sent."""

    def __init__(self, step_s: float = 0.0, **engine_kwargs: Any) -> None:
        engine = FakeStageEngine("fake-wan", EngineOptions(), **engine_kwargs)
        self._text, self._image, self._decode = engine.text_stage(), engine.image_stage(), engine.decode_stage()
        self.step_s = step_s
        self.calls: list[tuple[str, str, bool]] = []

    def _seen(self, stage: str, request: ResolvedRequest) -> None:
        self.calls.append((stage, request.prompt, getattr(request, "image", None) is not None))

    async def encode_text(self, request: ResolvedRequest) -> TextEmbeds:
        self._seen("text_encode", request)
        return self._text(request)

    async def encode_image(self, request: ResolvedRequest) -> ImageCond:
        self._seen("image_encode", request)
        return self._image(request)

    async def denoise(self, job_id: str, request: ResolvedRequest, text: Any, image: Any,
                      caller: Any = None) -> AsyncIterator:
        from serving.deployments import DenoiseProgress, LatentsRef

        await text
        if image is not None:
            await image
        self._seen("denoise", request)
        yield DenoiseProgress(0, request.steps)
        for step in range(1, request.steps + 1):
            await asyncio.sleep(self.step_s)
            yield DenoiseProgress(step, request.steps)
        done = asyncio.get_running_loop().create_future()
        done.set_result(Latents(latents=torch.zeros(request.latent_shape)))
        yield LatentsRef(done)  # awaitable like an ObjectRef

    async def decode(self, request: ResolvedRequest, latents: Any) -> EncodedVideo:
        self._seen("decode", request)
        return self._decode(request, await latents.ref)

    def handles(self) -> dict[str, LocalHandle]:
        """The `text`, `image`, `dit`, `decoder` arguments of `serving.ingress.Ingress`."""

        class _Text:
            encode = self.encode_text

        class _Image:
            encode = self.encode_image

        return {"text": LocalHandle(_Text), "image": LocalHandle(_Image), "dit": LocalHandle(self),
                "decoder": LocalHandle(self)}


def local_graph(step_s: float = 0.0, **engine_kwargs: Any) -> LocalGraph:
    """An in-process graph of fake stages (see `LocalGraph`)."""
    return LocalGraph(step_s, **engine_kwargs)


def bomb_png(width: int, height: int) -> bytes:
    """A real PNG of width x height black pixels: tiny on the wire (60 megapixels: 175 KB),
    huge once decoded. For the tests of the ingress's image limits."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (3 * width + 1)  # filter byte + RGB
    idat = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))

"""Test helpers of the UI tests: the service's real HTTP app (serving.ingress, API keys on) on the
real tiny-wan stages in this process, without Ray, served by uvicorn on a free port; a thread
that serves any ASGI app; loud reasons for tests that cannot run here."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from serving.fakes import LocalHandle

REPO = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "LIGHTX2V_REQUIRE_UI_TESTS"
"""Set (to 1) by .ci/run: a UI test that cannot run here fails instead of skipping."""
SCREENSHOTS_ENV = "LIGHTX2V_SCREENSHOTS"
"""A folder (e.g. docs) to copy the tests' screenshots into; unset: they stay in the test's tmp dir."""
NOT_RUN: list[str] = []
"""Why UI tests did not run, for the banner at the end of the session (tests/ui/conftest.py)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def did_not_run(what: str, reason: str) -> None:
    """Skip loudly (a banner at the end of the run), or fail where CI requires the UI tests."""
    import pytest

    message = f"{what} DID NOT RUN: {reason}"
    NOT_RUN.append(message)
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{message} ({REQUIRE_ENV} is set: CI must run it)")
    pytest.skip(message, allow_module_level=True)


class ServerThread:
    """An ASGI app served by uvicorn in a thread of this process."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="ui-test-service")

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test service did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def write_tiny_lora(path: Path) -> None:
    """A rank-4 LoRA (diffusers/PEFT keys) on every attention and feed-forward linear of tiny-wan."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.registry import get_spec

    checkpoint = Path(get_spec("tiny-wan").materialize())
    weights = {}
    for shard in sorted((checkpoint / "transformer").glob("*.safetensors")):
        weights.update(load_file(shard))
    g = torch.Generator().manual_seed(0)
    lora = {}
    for key, w in weights.items():
        if key.startswith("blocks.") and key.endswith(".weight") and w.dim() == 2 and (".attn" in key or ".ffn" in key):
            module = key[:-len(".weight")]
            lora[f"transformer.{module}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.5
            lora[f"transformer.{module}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.5
    assert lora, "tiny-wan has no attention / feed-forward linears?"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(path))


# ----------------------------------------------------------------------------- the stages in process


class StagesGraph:
    """The ingress's four deployment handles on a LocalPipeline's real stages (threads, no Ray),
    with the DiT's progress events and cancellation as serving/deployments.py's DiTGroup has them."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    async def encode_text(self, request):
        return await asyncio.to_thread(self.pipeline.text, request)

    async def encode_image(self, request):
        return await asyncio.to_thread(self.pipeline.image, request)

    async def denoise(self, job_id: str, request, text, image, caller: Any = None):
        from serving.deployments import DenoiseProgress, LatentsRef

        text = await text
        image = await image if image is not None else None
        yield DenoiseProgress(0, request.steps)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[int] = asyncio.Queue()
        stop = threading.Event()
        run = asyncio.ensure_future(asyncio.to_thread(
            self.pipeline.denoise, request, text, image,
            progress=lambda step, total: loop.call_soon_threadsafe(steps.put_nowait, step),
            should_cancel=stop.is_set))
        try:
            while not (run.done() and steps.empty()):
                getter = asyncio.ensure_future(steps.get())
                await asyncio.wait([getter, run], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield DenoiseProgress(getter.result(), request.steps)
                else:
                    getter.cancel()
            latents = await run
        except (asyncio.CancelledError, GeneratorExit):
            stop.set()  # the stage stops at its next step
            raise
        done = loop.create_future()
        done.set_result(latents)
        yield LatentsRef(done)  # awaitable like an ObjectRef

    async def decode(self, request, latents):
        return await asyncio.to_thread(self.pipeline.decode, request, await latents.ref)

    def handles(self) -> dict[str, LocalHandle]:
        """The `text`, `image`, `dit`, `decoder` arguments of serving.ingress.Ingress."""
        return {"text": LocalHandle(SimpleNamespace(encode=self.encode_text)),
                "image": LocalHandle(SimpleNamespace(encode=self.encode_image)),
                "dit": LocalHandle(self), "decoder": LocalHandle(self)}


def start_service(pipeline, model: str, data_dir: str, api_keys: list[str]) -> ServerThread:
    """The service's HTTP app (serving.ingress) for `model` on `pipeline`'s stages, with API keys."""
    from serving.ingress import Ingress

    ingress = Ingress({"model": model, "data_dir": data_dir}, **StagesGraph(pipeline).handles(),
                      service={"api_keys": api_keys, "ingress_replicas": 1})
    return ServerThread(ingress.__serve_build_asgi_app__()).__enter__()

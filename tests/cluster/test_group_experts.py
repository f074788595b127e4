"""Two experts (tiny-wan2.2-a14b) on the DiT worker group over gloo: cfg 2 x ulysses 2 gives the
world-size-1 latents for text-to-video and image-to-video, each expert sharded the same way, with
and without offload="expert" (accepted with parallel ranks; on CPU the weights already live in
host memory, so the offload is the no-op the engine logs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.group_denoise import GroupDenoiseStage
from engine.checkpoint import resolve_checkpoint
from engine.options import EngineOptions, ParallelConfig
from stages.pipeline import LocalPipeline
from stages.request import GenerationRequest

pytestmark = pytest.mark.ray
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def requests() -> dict[str, GenerationRequest]:
    image = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    common = dict(prompt="a red fox", negative_prompt="blurry", seed=5, output_type="latent", steps=4)
    return {"t2v": GenerationRequest(**common), "i2v": GenerationRequest(**common, image=image)}


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    pipe = LocalPipeline.from_checkpoint(resolve_checkpoint("tiny-wan2.2-a14b"), EngineOptions())
    experts = [pipe.denoise.spec.experts[0].name, pipe.denoise.spec.experts[1].name]
    assert experts == ["transformer", "transformer_2"]
    return pipe, {name: pipe.run(r).output.latents for name, r in requests().items()}


@pytest.mark.parametrize("offload", ["none", "expert"])
def test_two_experts_cfg2_ulysses2_equal_world_size_1(ray_session, single, offload):
    pipe, reference = single
    options = EngineOptions(offload=offload, parallel=ParallelConfig(cfg=2, ulysses=2))
    ckpt = resolve_checkpoint("tiny-wan2.2-a14b")
    group_stage = GroupDenoiseStage.start(ckpt, options, timeout_s=120)
    try:
        loaded = group_stage.group.get(group_stage.group.call("load_model", ckpt, options))
        assert all(x["experts"] == ["transformer", "transformer_2"] for x in loaded)
        grouped = LocalPipeline(pipe.spec, pipe.text, group_stage, pipe.decode, image=pipe.image)
        for name, request in requests().items():
            err = rel_err(grouped.run(request).output.latents, reference[name])
            assert err < TOL, f"{name} offload={offload}: rel err {err:.2e}"
    finally:
        group_stage.shutdown()

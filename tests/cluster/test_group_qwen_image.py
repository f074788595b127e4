"""Qwen-Image on the DiT worker group over gloo: CFG-parallel (cfg 2, each guidance branch on its
own rank, combined with the norm-rescaled true CFG) gives the world-size-1 latents; a Ulysses
degree > 1 is refused with the reason (joint text + image attention has no sequence split)."""
from __future__ import annotations

import pytest
import torch

from cluster.group_denoise import GroupDenoiseStage
from engine.checkpoint import resolve_checkpoint
from engine.options import EngineOptions, ParallelConfig
from stages.pipeline import LocalPipeline
from stages.request import GenerationRequest

pytestmark = pytest.mark.ray


def test_cfg_parallel_equals_world_size_1_and_ulysses_is_refused(ray_session):
    from engine.families import get_family
    from engine.parallel import check_parallel_config

    torch.set_num_threads(1)
    ckpt = resolve_checkpoint("tiny-qwen-image")
    pipe = LocalPipeline.from_checkpoint(ckpt, EngineOptions())
    requests = [GenerationRequest(prompt="a red fox", negative_prompt="blurry", seed=5, output_type="latent",
                                  steps=3, height=64, width=96, guidance_scale=4.0),
                GenerationRequest(prompt="a red fox", seed=5, output_type="latent", steps=3, guidance_scale=1.0)]
    reference = [pipe.run(r).output.latents for r in requests]

    group_stage = GroupDenoiseStage.start(ckpt, EngineOptions(parallel=ParallelConfig(cfg=2)), timeout_s=120)
    try:
        grouped = LocalPipeline(pipe.spec, pipe.text, group_stage, pipe.decode, image=pipe.image)
        for request, ref in zip(requests, reference):
            got = grouped.run(request).output.latents
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    finally:
        group_stage.shutdown()

    dit = get_family(ckpt.spec.family).load_dits(ckpt, EngineOptions())["transformer"]
    with pytest.raises(ValueError, match=r"parallel.ulysses=2: .* no sequence-parallel split.*CFG-parallel"):
        check_parallel_config(dit, 2)

"""Helpers for tests/engine/test_cache_lora_parallel.py: the body each spawned rank runs (a module
of its own, importable by name in `torch.multiprocessing.spawn` children)."""
from __future__ import annotations

import dataclasses
import os

import torch

import parallel_ranks as pr

STEPS = 8
TEA = {"coefficients": [1.0, 0.0], "threshold": 1.0, "ret_steps": 2}
MAG = {"mag_ratios": [1.0, 1.0, 0.995, 0.99, 0.99, 0.985, 0.98, 0.97], "threshold": 0.05,
       "max_skip_steps": 2, "retention_ratio": 0.2}
RUNS = {  # name -> (guidance, cache, cache options, with the LoRA)
    "magcache": (5.0, "magcache", MAG, False),
    "teacache": (5.0, "teacache", TEA, False),
    "teacache_guidance_off": (1.0, "teacache", TEA, False),
    "lora": (5.0, "none", None, True),
    "lora_magcache": (5.0, "magcache", MAG, True),
}


def lora_file(directory: str) -> str:
    """A rank-4 official-format LoRA with alpha and diff_b on every block's q, o and ffn.0."""
    from safetensors.torch import save_file

    path = os.path.join(directory, "style.safetensors")
    if os.path.exists(path):
        return path
    g = torch.Generator().manual_seed(5)
    d, ffn = 4 * 12, 32
    sd = {}
    for i in range(2):
        for name, (fan_in, fan_out) in {"self_attn.q": (d, d), "self_attn.o": (d, d), "ffn.0": (d, ffn)}.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            sd[f"{key}.lora_down.weight"] = torch.randn(4, fan_in, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(fan_out, 4, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(8.0)
            sd[f"{key}.diff_b"] = torch.randn(fan_out, generator=g) * 0.2
    save_file(sd, path)
    return path


def run_all(mesh, group, directory: str) -> dict:
    """Every run through DenoiseStage on this rank: latents and the cache's skipped steps."""
    from engine.options import EngineOptions
    from engine.parallel import apply_parallel
    from stages.denoise import DenoiseStage
    from stages.request import LoRARequest
    from tests.stages.fakes import SPEC, ConcatAdapter

    seen = {}

    class Recording(DenoiseStage):
        def _feature_cache(self, request):
            seen["cache"] = super()._feature_cache(request)
            return seen["cache"]

    case = pr.Case("t2v", "t2v", (16, 3, 6, 10), 5.0, steps=STEPS)
    out = {}
    model = pr.build_model("t2v", heads=4)
    spec = dataclasses.replace(SPEC, family="wan")      # the Wan family's LoRA key map
    stage = Recording({"transformer": model}, ConcatAdapter(), spec, EngineOptions(),
                      predictors={"transformer": apply_parallel(model, mesh)}, cache_group=group)
    path = lora_file(directory)
    for name, (guidance, cache, options, lora) in RUNS.items():
        request, text, image = pr.case_inputs(case)
        request = request.model_copy(update={
            "guidance_scale": guidance, "sampler": "euler", "cache": cache, "cache_options": options,
            "lora": (LoRARequest(path=path, strength=0.8),) if lora else ()})
        seen.clear()
        latents = stage(request, text, image).latents
        c = seen.get("cache")
        out[name] = (latents, None if c is None else (c.skipped_steps(), c.computed_steps()))
    return out


def rank_main(rank: int, world_size: int, init_file: str, cfg: int, ulysses: int, out_dir: str) -> None:
    import torch.distributed as dist

    from engine.options import ParallelConfig
    from engine.parallel import init_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_mesh(ParallelConfig(cfg=cfg, ulysses=ulysses), "cpu")
        torch.save(run_all(mesh, mesh.world.group, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def per_token_teacache(mesh, group) -> tuple:
    """TeaCache on a Wan2.2-TI2V-shaped DiT with per-token timesteps (frame 0 at t = 0): under
    Ulysses each rank holds part of the modulation, so the ranks agree only through the all-reduce."""
    from engine.cache import FeatureCache, TeaCacheConfig
    from engine.parallel import apply_parallel

    import wan22_ranks as w22

    model = w22.build_model("ti2v")
    predictor = apply_parallel(model, mesh)
    g = torch.Generator().manual_seed(9)
    f, h, w = 3, 6, 10
    x = torch.randn(1, 48, f, h, w, generator=g)
    context, negative = torch.randn(1, 7, 24, generator=g), torch.randn(1, 7, 24, generator=g)
    mask = torch.ones(f, h // 2, w // 2)
    mask[0] = 0.0                                             # the clean first frame's tokens at t = 0
    cache = FeatureCache(TeaCacheConfig(**PER_TOKEN_TEA), 8, group)
    with cache.applied(model), torch.no_grad():
        for i, t in enumerate(torch.linspace(950.0, 300.0, 8)):
            cache.begin_step(i)
            v = predictor(x, (mask * t).flatten()[None], context, negative, 4.0)
            x = x - 0.08 * v
    return x, cache.skipped_steps(), cache.computed_steps()


PER_TOKEN_TEA = {"coefficients": [1.0, 0.0], "threshold": 0.6, "ret_steps": 1}


def per_token_rank_main(rank: int, world_size: int, init_file: str, cfg: int, ulysses: int, out_dir: str) -> None:
    import torch.distributed as dist

    from engine.options import ParallelConfig
    from engine.parallel import init_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_mesh(ParallelConfig(cfg=cfg, ulysses=ulysses), "cpu")
        torch.save(per_token_teacache(mesh, mesh.world.group), os.path.join(out_dir, f"pt{rank}.pt"))
    finally:
        dist.destroy_process_group()

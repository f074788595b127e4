"""Helpers for test_parallel.py: a tiny HunyuanVideo-1.5 DiT, the cases, and the body each spawned
rank runs. Its own module (not the test file) so `torch.multiprocessing.spawn` children can import
it by name: the test puts this folder on sys.path, which spawn hands to the children."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.models.hunyuan_video15.transformer import DiTContext


@dataclass(frozen=True)
class Case:
    """One guided velocity prediction to compare across world sizes."""

    name: str
    latent_fhw: tuple[int, int, int]
    text_tokens: tuple[int, int]          # (prompt, negative prompt): the branches differ in length
    glyph_tokens: tuple[int, int]
    image: bool                           # SigLIP tokens (image-to-video)
    guidance_scale: float | None          # None: guidance off (one branch)
    meanflow: bool = False


CASES = (
    # 45 video + 16 image + 5/3 glyph + 9/6 text tokens: 75 / 70 in all, not divisible by 4
    Case("i2v_odd", (3, 3, 5), (9, 6), (5, 3), True, 5.0),
    Case("t2v_no_glyphs", (2, 4, 4), (7, 7), (0, 0), False, 6.0),
    # 2 video tokens among 30 context tokens: a rank's slice is all context
    Case("few_video_tokens", (2, 1, 1), (12, 10), (2, 0), True, 4.0),
    Case("guidance_off_meanflow", (3, 3, 5), (9, 9), (4, 4), True, None, meanflow=True),
)


def build_model(meanflow: bool):
    """The tiny DiT (4 heads) with deterministic weights, the same in every process."""
    from engine.models.hunyuan_video15 import tiny
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiT

    model = HunyuanVideo15DiT(tiny.dit_config(use_meanflow=meanflow))
    return tiny.randomize_(model, seed=11, qk_gain=3.0).eval().requires_grad_(False)


def case_inputs(case: Case, model) -> tuple:
    """(x, timestep, context, negative_context, guidance_scale, image_tokens), same in every process."""
    cfg = model.config
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, cfg.in_channels, *case.latent_fhw, generator=g)
    contexts = [DiTContext(torch.randn(1, n, cfg.text_embed_dim, generator=g),
                           torch.randn(1, m, cfg.text_embed_2_dim, generator=g))
                for n, m in zip(case.text_tokens, case.glyph_tokens)]
    image = torch.randn(1, 16, cfg.image_embed_dim, generator=g) if case.image else None
    t = torch.tensor([[731.0, 412.0]]) if case.meanflow else torch.tensor([731.0])
    negative = contexts[1] if case.guidance_scale is not None else None
    return x, t, contexts[0], negative, case.guidance_scale or 1.0, image


def predict(predictor_for, case: Case) -> torch.Tensor:
    """The guided velocity of one case through the predictor `predictor_for(model)`."""
    model = build_model(case.meanflow)
    predictor = predictor_for(model)
    x, t, context, negative, scale, image = case_inputs(case, model)
    with torch.no_grad():
        return predictor(x, t, context, negative, scale, image)


def rank_main(rank: int, world_size: int, init_file: str, cfg: int, ulysses: int, out_dir: str) -> None:
    """Spawned rank: join gloo, build the mesh, run every case, save this rank's velocities."""
    import torch.distributed as dist

    from engine.options import ParallelConfig
    from engine.parallel import apply_parallel, init_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_mesh(ParallelConfig(cfg=cfg, ulysses=ulysses), "cpu")
        results = {case.name: predict(lambda m: apply_parallel(m, mesh), case) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

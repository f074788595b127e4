"""Helpers for test_parallel22.py: tiny Wan2.2-shaped DiTs, the cases, and the body each spawned
rank runs. Its own module (not the test file) so `torch.multiprocessing.spawn` children can import
it by name: the test puts this folder on sys.path, which spawn hands to the children."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TEXT_LEN, TEXT_DIM = 7, 24


@dataclass(frozen=True)
class Case:
    """One guided velocity prediction to compare across world sizes."""

    name: str
    arch: str                     # "ti2v" (48 channels, per-token timesteps) or "a14b_i2v" (36 in, 16 out)
    latent_fhw: tuple[int, int, int]
    per_token: bool               # frame 0's tokens at t = 0 (TI2V image-to-video)
    guidance_scale: float | None  # None: guidance off (one branch)


CASES = (
    # 3 x 3 x 5 = 45 tokens: not divisible by 2 or 4 (the padding also pads the per-token modulation)
    Case("ti2v_i2v_odd", "ti2v", (3, 6, 10), True, 5.0),
    # 2 x 2 x 2 = 8 tokens: divisible
    Case("ti2v_i2v_even", "ti2v", (2, 4, 4), True, 5.0),
    Case("ti2v_i2v_guidance_off", "ti2v", (3, 6, 10), True, None),
    Case("ti2v_t2v", "ti2v", (3, 6, 10), False, 5.0),
    Case("a14b_i2v", "a14b_i2v", (3, 6, 10), False, 3.5),
)


def build_model(arch: str, heads: int = 4):
    """Deterministic tiny DiT (same weights in every process), weights large enough to matter."""
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer

    channels = {"ti2v": (48, 48), "a14b_i2v": (36, 16)}[arch]
    torch.manual_seed(4321 + len(arch))
    model = WanTransformer(WanDiTConfig(
        num_attention_heads=heads, attention_head_dim=12, in_channels=channels[0], out_channels=channels[1],
        ffn_dim=32, num_layers=2, text_dim=TEXT_DIM, freq_dim=16)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def case_inputs(case: Case, model) -> tuple:
    """(x, timestep, context, negative_context, guidance_scale) of a case, same in every process."""
    g = torch.Generator().manual_seed(9)
    f, h, w = case.latent_fhw
    x = torch.randn(1, model.config.in_channels, f, h, w, generator=g)
    context = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    negative = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g) if case.guidance_scale is not None else None
    t = torch.tensor([731.0])
    if case.per_token:  # as diffusers' expand_timesteps pipeline: (mask[0][0][:, ::2, ::2] * t).flatten()
        mask = torch.ones(1, 1, f, h, w)
        mask[:, :, 0] = 0
        t = (mask[0][0][:, ::2, ::2] * t).flatten()[None]  # (1, L)
    return x, t, context, negative, case.guidance_scale or 1.0


def predict(predictor_for, case: Case, heads: int = 4) -> torch.Tensor:
    """The guided velocity of one case through the predictor `predictor_for(model)`."""
    model = build_model(case.arch, heads)
    predictor = predictor_for(model)
    x, t, context, negative, scale = case_inputs(case, model)
    with torch.no_grad():
        return predictor(x, t, context, negative, scale, None)


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

"""Helpers for tests/engine/test_parallel.py: tiny models, cases, and the body each spawned rank runs.

Kept in its own module (not the test file) so `torch.multiprocessing.spawn` children can import it
by name: the test puts this folder on sys.path, which spawn hands to the children.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One denoising run to compare across world sizes."""

    name: str
    task: str                     # "t2v" or "i2v"
    latent_shape: tuple[int, int, int, int]
    guidance_scale: float
    steps: int = 2


CASES = (
    # 3 x 3 x 5 = 45 tokens: not divisible by 2 or 4 (exercises the padding)
    Case("t2v_odd_tokens", "t2v", (16, 3, 6, 10), 5.0),
    # 2 x 2 x 2 = 8 tokens: divisible
    Case("t2v_even_tokens", "t2v", (16, 2, 4, 4), 5.0),
    Case("i2v_odd_tokens", "i2v", (16, 3, 6, 10), 4.0),
    # guidance off: the cfg ranks join the Ulysses split (or compute redundantly)
    Case("t2v_guidance_off", "t2v", (16, 3, 6, 10), 1.0),
)

TEXT_LEN, TEXT_DIM, IMG_TOKENS, IMG_DIM = 7, 24, 5, 20


def dit_config(task: str, heads: int = 4):
    from engine.models.wan.transformer import WanDiTConfig

    i2v = task == "i2v"
    return WanDiTConfig(
        num_attention_heads=heads, attention_head_dim=12, in_channels=36 if i2v else 16,
        out_channels=16, ffn_dim=32, num_layers=2, text_dim=TEXT_DIM, freq_dim=16,
        image_dim=IMG_DIM if i2v else None, added_kv_proj_dim=heads * 12 if i2v else None,
    )


def build_model(task: str, heads: int = 4):
    """Deterministic tiny DiT (same weights in every process)."""
    from engine.models.wan.transformer import WanTransformer

    torch.manual_seed(1234 + (task == "i2v"))
    model = WanTransformer(dit_config(task, heads)).eval()
    # scale_shift_tables are randn/sqrt(D); make the other weights non-trivial but tame
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def case_inputs(case: Case):
    """The request and payloads of a case (same on every process)."""
    from stages.payloads import ImageCond, TextEmbeds
    from stages.request import ResolvedRequest

    g = torch.Generator().manual_seed(7)
    text = TextEmbeds(context=torch.randn(TEXT_LEN, TEXT_DIM, generator=g),
                      negative_context=torch.randn(TEXT_LEN, TEXT_DIM, generator=g))
    image = None
    if case.task == "i2v":
        _, f, h, w = case.latent_shape
        image = ImageCond(clip_tokens=torch.randn(IMG_TOKENS, IMG_DIM, generator=g),
                          latent_cond=torch.randn(20, f, h, w, generator=g))
    request = ResolvedRequest(
        model="test", prompt="p", negative_prompt="n", image=None, num_frames=1, height=16,
        width=16, steps=case.steps, guidance_scale=case.guidance_scale, shift=3.0,
        sampler="unipc", seed=11, fps=8, output_type="latent", latents=None,
        latent_shape=case.latent_shape)
    return request, text, image


def denoise(predictor_for, case: Case, heads: int = 4) -> torch.Tensor:
    """Run one case through `stages.DenoiseStage` with the predictor `predictor_for(model)`."""
    from engine.options import EngineOptions
    from tests.stages.fakes import denoise_stage

    model = build_model(case.task, heads)
    stage = denoise_stage(model, EngineOptions(), predictor=predictor_for(model))
    request, text, image = case_inputs(case)
    return stage(request, text, image).latents


def write_checkpoint(directory: str, task: str) -> str:
    """A diffusers-layout folder holding only this tiny DiT (all a DiT worker group loads)."""
    import json

    from safetensors.torch import save_file

    model = build_model(task)
    os.makedirs(os.path.join(directory, "transformer"))
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "_diffusers_version": "0.42.1"}, f)
    with open(os.path.join(directory, "transformer", "config.json"), "w") as f:
        json.dump({"_class_name": "WanTransformer3DModel", **model.config.to_dict()}, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "transformer", "diffusion_pytorch_model.safetensors"))
    return directory


def rank_main(rank: int, world_size: int, init_file: str, cfg: int, ulysses: int,
              heads: int, out_dir: str) -> None:
    """Spawned rank: join gloo, build the mesh, run every case, save this rank's latents."""
    import torch.distributed as dist

    from engine.options import ParallelConfig
    from engine.parallel import apply_parallel, init_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        mesh = init_mesh(ParallelConfig(cfg=cfg, ulysses=ulysses), "cpu")
        results = {}
        for case in CASES:
            results[case.name] = denoise(lambda m: apply_parallel(m, mesh), case, heads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- split VAE decode

VAE_TILE, VAE_OVERLAP = (8, 8), (4, 4)


def dit_inputs(cfg, seed: int = 0) -> tuple:
    """Inputs for one forward of a (tiny) Wan DiT with config `cfg`: latents (1, C, 2, 4, 4), the
    timestep, 8 text tokens and, for an image branch, 257 image tokens."""
    torch.manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4)
    ctx = torch.randn(1, 8, cfg.text_dim)
    img = torch.randn(1, 257, cfg.image_dim) if cfg.image_dim else None
    return x, torch.tensor([500.0]), ctx, img


def randomize_norms_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norm gammas (1 + 0.2 N) and biases (0.05 N), so a swapped norm or bias shows; the
    other weights keep their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def build_vae():
    """Deterministic tiny Wan VAE (z_dim 4) with non-trivial norms and biases."""
    from engine.models.wan.vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, latents_mean=(0.1, -0.2, 0.0, 0.3),
                              latents_std=(1.5, 0.8, 1.0, 1.2))).eval()
    return randomize_norms_(vae, seed=3)


def vae_latents() -> torch.Tensor:
    return torch.randn(1, 4, 2, 12, 12, generator=torch.Generator().manual_seed(5))


def vae_rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Spawned rank: split-decode the latents over the world; rank 0 saves the video."""
    import torch.distributed as dist

    from engine.parallel.mesh import SubGroup
    from engine.parallel.vae import split_decode

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        group = SubGroup(dist.group.WORLD, world_size, rank)
        with torch.no_grad():
            video = split_decode(build_vae(), vae_latents(), group, VAE_TILE, VAE_OVERLAP)
        assert (video is None) == (rank != 0)
        if video is not None:
            torch.save(video, os.path.join(out_dir, "video.pt"))
    finally:
        dist.destroy_process_group()

"""Wan2.2 DiT features against diffusers 0.42.1 `WanTransformer3DModel` (float32, CPU):

- TI2V-5B-like (48 latent channels): per-token timesteps (diffusers' `expand_timesteps`), with the
  first latent frame's tokens at t = 0 as diffusers' image-to-video pipeline builds them;
- A14B-I2V-like (36 input channels, no CLIP branch: `image_dim` None), one timestep per sample.

Weights are random and large (every parameter + 0.3 N(0, 1)) so that a mistake shows: each test
also checks that a deliberate error (frame 0 at t instead of 0, conditioning channels dropped)
moves the output far beyond the parity tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch

from engine.models.wan.transformer import WanDiTConfig, WanTransformer

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

torch.set_num_threads(1)

TOL = 1e-5       # float32 parity (relative, norm-wise); the same ops in the same order give 0 here
MISTAKE = 1e-2   # a deliberate mistake must move the output by more than this (1000x TOL)

TI2V = dict(num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48, text_dim=24,
            freq_dim=16, ffn_dim=48, num_layers=2)
A14B_I2V = dict(num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16, text_dim=24,
                freq_dim=16, ffn_dim=48, num_layers=2, image_dim=None, added_kv_proj_dim=None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pair(config: dict, seed: int = 0) -> tuple[WanTransformer3DModel, WanTransformer]:
    """diffusers' model with large random weights, and ours loaded from its state dict (strict)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = WanTransformer(WanDiTConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def latents(config: dict, batch: int = 2, frames: int = 3, height: int = 6, width: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], frames, height, width, generator=g)
    ctx = torch.randn(batch, 7, config["text_dim"], generator=g)
    return x, ctx


def diffusers_token_timesteps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What diffusers' WanImageToVideoPipeline (expand_timesteps) passes: `first_frame_mask` 0 on
    latent frame 0, `(mask[0][0][:, ::2, ::2] * t).flatten()` per sample -> (B, F' * H' * W')."""
    b, _, f, h, w = x.shape
    first_frame_mask = torch.ones(1, 1, f, h, w)
    first_frame_mask[:, :, 0] = 0
    return torch.stack([(first_frame_mask[0][0][:, ::2, ::2] * ti).flatten() for ti in t])


@torch.no_grad()
def run_ref(ref, x, t, ctx, img=None):
    return ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------
# TI2V-5B-like: per-token timesteps


def test_ti2v_per_token_timesteps_match_diffusers():
    ref, ours = pair(TI2V)
    x, ctx = latents(TI2V)
    t = torch.tensor([900.0, 351.0])
    t_tok = diffusers_token_timesteps(x, t)                     # (2, 45): 15 zeros, then t, per sample
    assert t_tok.shape == (2, 3 * 3 * 5) and (t_tok[:, :15] == 0).all() and (t_tok[:, 15:] == t[:, None]).all()
    with torch.no_grad():
        expected = run_ref(ref, x, t_tok, ctx)
        got = ours(x, t_tok, ctx)
        wrong = ours(x, t, ctx)                                 # frame 0 at t instead of 0
    assert got.shape == (2, 48, 3, 6, 10)
    assert rel_err(got, expected) < TOL
    assert rel_err(wrong, expected) > MISTAKE
    # the mistake hits frame 0 hardest (it reaches the other frames through attention)
    assert rel_err(wrong[:, :, 0], expected[:, :, 0]) > rel_err(wrong[:, :, 1:], expected[:, :, 1:])


def test_ti2v_all_tokens_at_t_equal_the_per_sample_path():
    """Text-to-video on TI2V: diffusers' mask is all ones, the per-token timesteps all equal t;
    the per-sample (B,) path gives the same output (and skips the per-token embedding)."""
    ref, ours = pair(TI2V)
    x, ctx = latents(TI2V)
    t = torch.tensor([999.0, 20.0])
    t_tok = t[:, None].expand(2, 45).contiguous()
    with torch.no_grad():
        per_token, per_sample = ours(x, t_tok, ctx), ours(x, t, ctx)
        expected = run_ref(ref, x, t_tok, ctx)
    assert rel_err(per_token, per_sample) < 1e-6
    assert rel_err(per_token, expected) < TOL


def test_per_token_timesteps_broadcast_and_refusals():
    _, ours = pair(TI2V)
    x, ctx = latents(TI2V)
    t_tok = diffusers_token_timesteps(x[:1], torch.tensor([500.0]))      # (1, 45) shared by the batch
    with torch.no_grad():
        shared = ours(x, t_tok, ctx)
        each = ours(x, t_tok.expand(2, -1), ctx)
    assert torch.equal(shared, each)
    with pytest.raises(ValueError, match=r"per-token timestep must be \(B=2, L=45\).*\(2, 44\)"):
        ours(x, torch.zeros(2, 44), ctx)
    with pytest.raises(ValueError, match=r"timestep must be \(B=2,\) one per sample, or \(B, L=45\).*\(3,\)"):
        ours(x, torch.zeros(3), ctx)


def test_per_token_modulation_is_aligned_with_the_tokens():
    """Permuting the tokens (and every tensor the sequence seam hands over as aligned with them)
    before the blocks and restoring the order after leaves the per-token output unchanged: the
    per-token modulation travels with its tokens through the `SequenceHooks` seam (what Ulysses
    shards)."""
    from engine.dit import SequenceHooks

    class Permuting(SequenceHooks):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
            self.shapes: list[tuple[int, ...]] = []

        def split(self, x, *aligned):
            self.shapes = [tuple(t.shape) for t in (x, *aligned)]
            return (x[:, self.perm], *(t if t.shape[1] == 1 else t[:, self.perm] for t in aligned))

        def gather(self, x):
            return x[:, torch.argsort(self.perm)]

    _, ours = pair(TI2V)
    x, ctx = latents(TI2V)
    t_tok = diffusers_token_timesteps(x, torch.tensor([700.0, 300.0]))
    with torch.no_grad():
        expected = ours(x, t_tok, ctx)
        ours.sequence = Permuting(45)
        got = ours(x, t_tok, ctx)
    assert ours.sequence.shapes == [(2, 45, 32), (1, 45, 1, 8), (1, 45, 1, 8), (2, 45, 6, 32)]
    assert rel_err(got, expected) < 1e-6


def test_ti2v_per_token_bf16_follows_diffusers_precision_recipe():
    """In bf16 (time embedder, modulation and norms kept float32) the per-token path rounds as
    diffusers' does: far closer to it than to the float32 result."""
    ref, ours = pair(TI2V)
    x, ctx = latents(TI2V)
    t_tok = diffusers_token_timesteps(x, torch.tensor([800.0, 400.0]))
    with torch.no_grad():
        full = ours(x, t_tok, ctx)
    for model in (ref, ours):
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if WanTransformer.keeps_fp32(name) else torch.bfloat16)
    with torch.no_grad():
        low = ours(x.bfloat16(), t_tok, ctx.bfloat16())
        ref_low = run_ref(ref, x.bfloat16(), t_tok, ctx.bfloat16())
    assert rel_err(low, full) > 1e-3                # really ran in low precision
    assert rel_err(low, ref_low) < 1e-4


def test_ti2v_per_token_through_the_fused_modules():
    """The Wan fusions (q|k|v in one GEMM; on CPU their eager fallback) keep the per-token output."""
    from engine.kernels import fuse_modules

    _, ours = pair(TI2V)
    fused = copy.deepcopy(ours)
    assert fuse_modules(fused) == 2 * TI2V["num_layers"]
    x, ctx = latents(TI2V)
    t_tok = diffusers_token_timesteps(x, torch.tensor([600.0, 100.0]))
    with torch.no_grad():
        assert rel_err(fused(x, t_tok, ctx), ours(x, t_tok, ctx)) < 1e-5


# ----------------------------------------------------------------------------------------------
# A14B-I2V-like: 36 input channels, no CLIP branch


def test_a14b_i2v_matches_diffusers_without_image_branch():
    ref, ours = pair(A14B_I2V)
    assert ours.condition_embedder.image_embedder is None and ours.blocks[0].attn2.add_k_proj is None
    x, ctx = latents(A14B_I2V)                                  # 16 noisy + 4 mask + 16 conditioning
    t = torch.tensor([875.0, 874.0])
    with torch.no_grad():
        expected = run_ref(ref, x, t, ctx)
        got = ours(x, t, ctx)
        no_condition = x.clone()
        no_condition[:, 16:] = 0                                # the image conditioning dropped
        wrong = ours(no_condition, t, ctx)
    assert got.shape == (2, 16, 3, 6, 10)
    assert rel_err(got, expected) < TOL
    assert rel_err(wrong, expected) > MISTAKE
    with pytest.raises(ValueError, match="no image branch"):
        ours(x, t, ctx, torch.zeros(2, 257, 1280))


def test_official_config_without_img_emb_builds_the_a14b_i2v_shape():
    """The official release's config says model_type "i2v" for A14B I2V too; the loader passes
    what the weights show (no img_emb keys), giving the same architecture as diffusers'."""
    official = {"dim": 32, "num_heads": 2, "in_dim": 36, "out_dim": 16, "ffn_dim": 48, "num_layers": 2,
                "freq_dim": 16, "text_dim": 24, "model_type": "i2v", "eps": 1e-6}
    cfg = WanDiTConfig.from_official(official, has_image_embedder=False)
    assert cfg == WanDiTConfig.from_dict(A14B_I2V)

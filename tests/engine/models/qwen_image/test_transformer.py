"""The Qwen-Image DiT alone against diffusers 0.42.1's `QwenImageTransformer2DModel` (float32, CPU,
random weights at std ~0.3): a padded, masked batch of two prompts, and Edit-2511's reference
latents with zero_cond_t, on non-square sizes. The pipelines never pad (one prompt per forward);
the masked path is there for batches of prompts of different lengths."""
from __future__ import annotations

import pytest
import torch

from engine.models.qwen_image.transformer import QwenImageDiTConfig, QwenImageTransformer, pack

diffusers = pytest.importorskip("diffusers")

SIZES = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))


def pair(zero_cond_t: bool):
    from diffusers import QwenImageTransformer2DModel

    ref = QwenImageTransformer2DModel(**SIZES, zero_cond_t=zero_cond_t).eval()
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) * (0.3 if v.ndim > 1 else 0.1) + ("norm" in k)
             for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours = QwenImageTransformer(QwenImageDiTConfig(**SIZES, zero_cond_t=zero_cond_t)).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_a_masked_batch_with_references_matches_diffusers():
    ref, ours = pair(zero_cond_t=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 1, 6, 10, generator=gen)                    # 3 x 5 tokens
    refs = [torch.randn(1, 16, 1, 8, 4, generator=gen), torch.randn(1, 16, 1, 4, 6, generator=gen)]
    context = torch.randn(2, 9, 48, generator=gen)
    mask = torch.ones(2, 9)
    mask[0, 7:] = 0                                                      # prompt 0 has 7 tokens
    t = torch.tensor([700.0, 700.0])
    shapes = [[(1, 3, 5), (1, 4, 2), (1, 2, 3)]] * 2
    hidden = torch.cat([pack(x, 2)] + [pack(r, 2).expand(2, -1, -1) for r in refs], dim=1)
    want = ref(hidden_states=hidden, encoder_hidden_states=context, encoder_hidden_states_mask=mask,
               timestep=t / 1000, img_shapes=shapes, return_dict=False)[0][:, :15]
    got = ours(x, t, context, refs, context_mask=mask)
    assert got.shape == (2, 16, 1, 6, 10) and want.abs().mean() > 1
    assert rel(pack(got, 2), want) < 1e-5
    # the mask matters: without it, prompt 0 attends to its padding
    assert rel(pack(ours(x, t, context, refs), 2), want) > 1e-2
    # and so does the second timestep of the references (zero_cond_t)
    ours.config = QwenImageDiTConfig(**SIZES, zero_cond_t=False)
    assert rel(pack(ours(x, t, context, refs, context_mask=mask), 2), want) > 1e-2


@torch.no_grad()
def test_text_to_image_matches_diffusers():
    ref, ours = pair(zero_cond_t=False)
    gen = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 16, 1, 8, 4, generator=gen), torch.randn(1, 11, 48, generator=gen)
    t = torch.tensor([312.5])
    want = ref(hidden_states=pack(x, 2), encoder_hidden_states=context, encoder_hidden_states_mask=None,
               timestep=t / 1000, img_shapes=[[(1, 4, 2)]], return_dict=False)[0]
    assert rel(pack(ours(x, t, context), 2), want) < 1e-5

"""HunyuanVideo-1.5 DiT and VAE against diffusers 0.42.1 (float32, CPU), on random weights.

diffusers' transformer gets padded text, glyph and image tokens with masks (as its pipelines pass
them); ours gets the valid tokens only: the outputs must agree. The weights are scaled so that a
dropped text token, a missing glyph stream or a wrong timestep moves the output far beyond the
tolerance (checked). Also: meta builds load every checkpoint tensor (strict), the official key
maps round-trip, the seams are declared.
"""
from __future__ import annotations

import pytest
import torch

from engine.dit import check_dit
from engine.models.hunyuan_video15 import keymaps, tiny
from engine.models.hunyuan_video15.transformer import DiTContext, HunyuanVideo15DiT
from engine.models.hunyuan_video15.vae import HunyuanVideo15VAE, Tiling

diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
L_TXT, L_GLY, L_IMG = 14, 9, 16
N_TXT, N_GLY = 9, 4
"""Padded lengths and valid counts of the text and glyph tokens."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def models():
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    ours = tiny.randomize_(HunyuanVideo15DiT(tiny.dit_config(use_meanflow=True)), qk_gain=3.0).eval()
    ref = HunyuanVideo15Transformer3DModel(**ours.config.to_dict()).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 65, 3, 4, 6, generator=g)
    text, glyph = torch.randn(1, L_TXT, 32, generator=g), torch.randn(1, L_GLY, 24, generator=g)
    image = torch.randn(1, L_IMG, 32, generator=g)
    mask, mask_2 = torch.zeros(1, L_TXT), torch.zeros(1, L_GLY)
    mask[:, :N_TXT], mask_2[:, :N_GLY] = 1, 1
    return x, text, mask, glyph, mask_2, image


def reference(ref, inputs, *, glyph: bool, image: bool, t=700.0, t_r=350.0):
    x, text, mask, gly, mask_2, img = inputs
    with torch.no_grad():
        return ref(x, torch.tensor([t]), text, mask, timestep_r=torch.tensor([t_r]), encoder_hidden_states_2=gly,
                   encoder_attention_mask_2=mask_2 if glyph else torch.zeros_like(mask_2),
                   image_embeds=img if image else torch.zeros_like(img), return_dict=False)[0]


def ours_out(ours, inputs, *, glyph: bool, image: bool, t=700.0, t_r=350.0, n_txt=N_TXT):
    x, text, _, gly, _, img = inputs
    context = DiTContext(text=text[:, :n_txt], glyph=gly[:, :N_GLY if glyph else 0])
    with torch.no_grad():
        return ours(x, torch.tensor([[t, t_r]]), context, img if image else None)


@pytest.mark.parametrize("glyph,image", [(True, True), (True, False), (False, False), (False, True)])
def test_dit_matches_diffusers(models, inputs, glyph, image):
    ours, ref = models
    want = reference(ref, inputs, glyph=glyph, image=image)
    got = ours_out(ours, inputs, glyph=glyph, image=image)
    assert got.shape == want.shape == (1, 32, 3, 4, 6)
    assert rel(got, want) < TOL


def test_dit_mistakes_would_fail(models, inputs):
    ours, ref = models
    want = reference(ref, inputs, glyph=True, image=True)
    mistakes = {
        "a text token dropped": ours_out(ours, inputs, glyph=True, image=True, n_txt=N_TXT - 1),
        "glyph tokens dropped": ours_out(ours, inputs, glyph=False, image=True),
        "image tokens dropped": ours_out(ours, inputs, glyph=True, image=False),
        "timestep off by 1": ours_out(ours, inputs, glyph=True, image=True, t=701.0),
        "t_r ignored": ours_out(ours, inputs, glyph=True, image=True, t_r=0.0),
    }
    for label, got in mistakes.items():
        assert rel(got, want) > 10 * TOL, label


def test_meta_build_and_seams(models):
    ours, _ = models
    check_dit(ours)
    with torch.device("meta"):
        skeleton = HunyuanVideo15DiT(ours.config)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert not list(skeleton.buffers())  # nothing computed in __init__: a meta build is complete


def test_dit_key_maps_round_trip(models):
    ours, ref = models
    state = ref.state_dict()
    official = keymaps.dit_diffusers_to_official(state)
    assert "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight" in official
    assert "double_blocks.1.txt_attn_k_norm.weight" in official and "final_layer.linear.bias" in official
    back = keymaps.dit_official_to_diffusers(official)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # the final modulation's halves are stored the other way round officially
    scale_shift = state["norm_out.linear.weight"]
    swapped = scale_shift.roll(scale_shift.shape[0] // 2, 0)
    assert torch.equal(official["final_layer.adaLN_modulation.1.weight"], swapped)
    with pytest.raises(ValueError, match="no mapping for key"):
        keymaps.dit_official_to_diffusers({"single_blocks.0.linear1.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vaes():
    from diffusers import AutoencoderKLHunyuanVideo15

    cfg = dict(latent_channels=8, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
               spatial_compression_ratio=8, temporal_compression_ratio=4)
    ours = tiny.randomize_(HunyuanVideo15VAE(tiny.vae_config(**cfg)), seed=3).eval()
    ref = AutoencoderKLHunyuanVideo15(**cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def test_vae_matches_diffusers(vaes):
    ours, ref = vaes
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(video).latent_dist.mode() * ref.config.scaling_factor
        got = ours.encode(video)
        assert got.shape == (1, 8, 3, 4, 6) and rel(got, want) < 1e-5
        frames = ref.decode(want / ref.config.scaling_factor).sample
        assert frames.std() > 0.1 and rel(ours.decode(want), frames) < 1e-5
        # frame-causal: the first frame's latents do not see the later frames
        assert rel(ours.encode(video[:, :, :1]), got[:, :, :1]) < 1e-5


def test_vae_tiled_decode_matches_diffusers(vaes):
    ours, ref = vaes
    z = torch.randn(1, 8, 2, 12, 16, generator=torch.Generator().manual_seed(4))   # 2 x 3 tiles of 64 px
    ref.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=8,
                      tile_latent_min_width=8)
    ours.tiling = Tiling(tile=64)
    try:
        with torch.no_grad():
            want = ref.decode(z).sample
            got = ours.decode(z * ref.config.scaling_factor)
    finally:
        ref.disable_tiling()
        ours.tiling = None
    assert got.shape == want.shape == (1, 3, 5, 96, 128)
    assert rel(got, want) < 1e-5


def test_vae_key_maps_round_trip(vaes):
    ours, _ = vaes
    state = ours.state_dict()
    official = keymaps.vae_diffusers_to_official(state)
    assert "encoder.down.0.block.0.conv1.conv.weight" in official and "decoder.mid.attn_1.q.weight" in official
    assert "encoder.mid.block_2.norm2.gamma" in official and "decoder.up.0.upsample.conv.conv.bias" in official
    back = keymaps.vae_official_to_diffusers(official)
    assert set(back) == set(state) and all(back[k] is state[k] for k in state)

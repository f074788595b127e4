"""WanVAE: parity with diffusers' AutoencoderKLWan on the same random weights (float32, CPU),
key maps, meta-device loading, per-call caches, speed paths (bf16, channels-last) and tiling."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from engine.models.wan.keymap_vae import diffusers_to_official, official_to_diffusers
from engine.models.wan.vae import (
    DEFAULT_TILING,
    WanVAE,
    WanVAEConfig,
    blend,
    decode_tile,
    plan_tiles,
    tiled_decode,
)

sys.path.insert(0, os.path.dirname(__file__))
from parallel_ranks import randomize_norms_  # noqa: E402  (shared with the split-decode tests)

diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

MEAN = (0.3, -0.5, 0.1, 0.8)
STD = (1.7, 0.6, 2.2, 1.1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_config(**changes) -> WanVAEConfig:
    fields = dict(base_dim=8, z_dim=4, latents_mean=MEAN, latents_std=STD)
    return WanVAEConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def pair():
    """(diffusers reference, ours) with identical random weights."""
    torch.manual_seed(0)
    config = tiny_config()
    ref = randomize_norms_(diffusers.AutoencoderKLWan(**config.to_dict())).eval()
    ours = WanVAE(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def stats(config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, config.z_dim, 1, 1, 1)
    return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)


def reference_encode(ref, video: torch.Tensor, config: WanVAEConfig) -> torch.Tensor:
    """As WanImageToVideoPipeline: posterior mode, then (z - mean) * (1 / std)."""
    mean, std = stats(config)
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
    return (mu - mean) * (1.0 / std)


def reference_decode(ref, latents: torch.Tensor, config: WanVAEConfig) -> torch.Tensor:
    """As WanPipeline: latents / (1 / std) + mean, then decode."""
    mean, std = stats(config)
    with torch.no_grad():
        return ref.decode(latents / (1.0 / std) + mean).sample


# ---------------------------------------------------------------------------------------------
# Structure and parity
# ---------------------------------------------------------------------------------------------


def test_parameter_keys_and_shapes_equal_diffusers(pair):
    ref, ours = pair
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_default_config_keys_equal_diffusers_wan21():
    """The real Wan2.1 size (built on meta: no memory) has diffusers' keys and shapes."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
        ours = WanVAE(WanVAEConfig())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(127e6, rel=0.01)


@pytest.mark.parametrize("frames,size,batch", [(9, 32, 1), (5, 16, 2), (1, 16, 1)])
def test_encode_matches_diffusers(pair, frames, size, batch):
    ref, ours = pair
    torch.manual_seed(frames)
    video = torch.rand(batch, 3, frames, size, size + 8) * 2 - 1
    expected = reference_encode(ref, video, ours.config)
    got = ours.encode(video)
    assert got.shape == (batch, 4, (frames - 1) // 4 + 1, size // 8, (size + 8) // 8)
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("latent_frames,size,batch", [(3, 4, 1), (2, 3, 2), (1, 4, 1)])
def test_decode_matches_diffusers(pair, latent_frames, size, batch):
    ref, ours = pair
    torch.manual_seed(latent_frames)
    latents = torch.randn(batch, 4, latent_frames, size, size + 1)
    expected = reference_decode(ref, latents, ours.config)
    got = ours.decode(latents)
    assert got.shape == (batch, 3, 4 * (latent_frames - 1) + 1, 8 * size, 8 * (size + 1))
    assert (expected.abs() < 1).float().mean() > 0.9  # the comparison is not of clamped values
    assert rel_err(got, expected) < 1e-4


def test_decode_differs_when_weights_differ(pair):
    """The parity above is not vacuous: a perturbed weight shows."""
    ref, ours = pair
    other = WanVAE(ours.config).eval()
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["decoder.up_blocks.1.upsamplers.0.time_conv.weight"] += 0.05
    other.load_state_dict(sd)
    latents = torch.randn(1, 4, 2, 4, 4)
    assert rel_err(other.decode(latents), ours.decode(latents)) > 1e-3


def test_frames_must_be_4k_plus_1(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours.encode(torch.zeros(1, 3, 6, 16, 16))


def test_decode_checks_latent_channels(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="z_dim=4"):
        ours.decode(torch.zeros(1, 16, 1, 2, 2))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_from_dict_ignores_unknown_and_round_trips():
    d = {**tiny_config().to_dict(), "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1",
         "something_new": 1}
    config = WanVAEConfig.from_dict(d)
    assert config == tiny_config()
    assert WanVAEConfig.from_dict(config.to_dict()) == config
    # diffusers accepts our dict as its config
    assert diffusers.AutoencoderKLWan.from_config(config.to_dict()).config.z_dim == 4


def test_wan22_config_is_parsed_and_inconsistent_ones_refused_clearly():
    """(The Wan2.2 VAE itself is tested in tests/engine/models/wan/test_vae22.py.)"""
    wan22 = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True,
             "patch_size": 2, "scale_factor_spatial": 16, "in_channels": 12, "out_channels": 12,
             "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48, "temperal_downsample": [False, True, True]}
    config = WanVAEConfig.from_dict(wan22)
    assert config.is_residual and config.patch_size == 2 and config.spatial_scale == 16
    with pytest.raises(ValueError, match="in_channels and out_channels must be 3 \\* patch_size\\*\\*2 = 12"):
        WanVAE(WanVAEConfig.from_dict({**wan22, "in_channels": 3}))
    with pytest.raises(ValueError, match="scale_factor_spatial=8 contradicts"):
        WanVAE(WanVAEConfig.from_dict({**wan22, "scale_factor_spatial": 8}))


def test_config_validates_lengths():
    with pytest.raises(ValueError, match="latents_mean needs z_dim = 4"):
        WanVAEConfig(z_dim=4, latents_mean=(0.0,) * 3, latents_std=(1.0,) * 4)
    with pytest.raises(ValueError, match="temperal_downsample needs"):
        tiny_config(temperal_downsample=(True,))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_meta_build_and_assign(pair):
    _, ours = pair
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    loaded = WanVAE.from_state_dict(ours.config, sd)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.post_quant_conv.weight.data_ptr() == sd["post_quant_conv.weight"].data_ptr()  # assigned
    latents = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(loaded.decode(latents), ours.decode(latents))
    with pytest.raises(RuntimeError, match="Missing key"):
        WanVAE.from_state_dict(ours.config, {k: v for k, v in sd.items() if "conv_out" not in k})


def official_keys(config: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    """Official Wan2.1 VAE key -> shape, written from the official module layout
    (wan/modules/vae.py), independently of keymap_vae."""
    keys: dict[str, tuple[int, ...]] = {}
    z, nres = config.z_dim, config.num_res_blocks

    def conv(name, cin, cout, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (cout, cin, *k), (cout,)

    def residual(name, cin, cout):
        keys[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{name}.residual.2", cin, cout, (3, 3, 3))
        keys[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{name}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{name}.shortcut", cin, cout, (1, 1, 1))

    def middle(part, d):
        residual(f"{part}.middle.0", d, d)
        keys[f"{part}.middle.1.norm.gamma"] = (d, 1, 1)
        conv(f"{part}.middle.1.to_qkv", d, 3 * d, (1, 1))
        conv(f"{part}.middle.1.proj", d, d, (1, 1))
        residual(f"{part}.middle.2", d, d)

    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    conv("encoder.conv1", 3, dims[0], (3, 3, 3))
    i = 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(nres):
            residual(f"encoder.downsamples.{i}", cin, cout)
            cin, i = cout, i + 1
        if level != len(config.dim_mult) - 1:
            conv(f"encoder.downsamples.{i}.resample.1", cout, cout, (3, 3))
            if config.temperal_downsample[level]:
                conv(f"encoder.downsamples.{i}.time_conv", cout, cout, (3, 1, 1))
            i += 1
    middle("encoder", dims[-1])
    keys["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", dims[-1], 2 * z, (3, 3, 3))
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))

    dims = [config.base_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
    up_time = tuple(reversed(config.temperal_downsample))
    conv("decoder.conv1", z, dims[0], (3, 3, 3))
    middle("decoder", dims[0])
    i = 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            cin //= 2
        for _ in range(nres + 1):
            residual(f"decoder.upsamples.{i}", cin, cout)
            cin, i = cout, i + 1
        if level != len(config.dim_mult) - 1:
            conv(f"decoder.upsamples.{i}.resample.1", cout, cout // 2, (3, 3))
            if up_time[level]:
                conv(f"decoder.upsamples.{i}.time_conv", cout, 2 * cout, (3, 1, 1))
            i += 1
    keys["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", dims[-1], 3, (3, 3, 3))
    return keys


@pytest.mark.parametrize("config", [tiny_config(), WanVAEConfig()], ids=["tiny", "wan2.1"])
def test_official_keys_map_onto_our_module(config):
    shapes = official_keys(config)
    mapped = official_to_diffusers(shapes)
    with torch.device("meta"):
        ours = WanVAE(config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == mapped
    assert diffusers_to_official(mapped) == shapes


def test_official_key_map_matches_diffusers_conversion_table():
    """Spot checks against the table in diffusers' scripts/convert_wan_to_diffusers.py."""
    mapped = official_to_diffusers({k: k for k in official_keys(WanVAEConfig())})  # ours -> official
    expected = {
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": "decoder.upsamples.4.shortcut.weight",
        "decoder.up_blocks.0.upsamplers.0.time_conv.bias": "decoder.upsamples.3.time_conv.bias",
        "decoder.up_blocks.2.upsamplers.0.resample.1.weight": "decoder.upsamples.11.resample.1.weight",
        "decoder.up_blocks.3.resnets.2.norm2.gamma": "decoder.upsamples.14.residual.3.gamma",
        "decoder.up_blocks.2.resnets.0.conv1.weight": "decoder.upsamples.8.residual.2.weight",
        "encoder.down_blocks.5.time_conv.weight": "encoder.downsamples.5.time_conv.weight",
        "encoder.down_blocks.3.conv_shortcut.bias": "encoder.downsamples.3.shortcut.bias",
        "encoder.mid_block.attentions.0.to_qkv.weight": "encoder.middle.1.to_qkv.weight",
        "decoder.mid_block.resnets.1.conv2.bias": "decoder.middle.2.residual.6.bias",
        "encoder.norm_out.gamma": "encoder.head.0.gamma",
        "decoder.conv_out.weight": "decoder.head.2.weight",
        "encoder.conv_in.weight": "encoder.conv1.weight",
        "quant_conv.weight": "conv1.weight",
        "post_quant_conv.bias": "conv2.bias",
    }
    for ours_key, official_key in expected.items():
        assert mapped[ours_key] == official_key


def test_official_round_trip_values(pair):
    """Official .pth layout -> our module gives the same decode (values follow their keys)."""
    _, ours = pair
    official = diffusers_to_official(ours.state_dict())
    assert set(official) == set(official_keys(ours.config))
    restored = WanVAE.from_state_dict(ours.config, official_to_diffusers(official))
    latents = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(restored.decode(latents), ours.decode(latents))


# ---------------------------------------------------------------------------------------------
# Per-call cache
# ---------------------------------------------------------------------------------------------


def test_no_state_left_on_modules_between_calls(pair):
    _, ours = pair
    before = {name: dict(vars(m)).keys() for name, m in ours.named_modules()}
    a, b = torch.randn(1, 4, 3, 3, 3), torch.randn(1, 4, 2, 3, 3)
    first = ours.decode(a)
    ours.decode(b)
    ours.encode(torch.rand(1, 3, 5, 16, 16))
    assert torch.equal(ours.decode(a), first)
    assert {name: dict(vars(m)).keys() for name, m in ours.named_modules()} == before


def test_concurrent_decodes_do_not_leak(pair):
    _, ours = pair
    inputs = [torch.randn(1, 4, 3, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [ours.decode(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(2):
            results[i] = ours.decode(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert torch.equal(results[i], expected[i])


# ---------------------------------------------------------------------------------------------
# Speed paths
# ---------------------------------------------------------------------------------------------


def test_channels_last_matches(pair):
    _, ours = pair
    cl = WanVAE.from_state_dict(ours.config, {k: v.clone() for k, v in ours.state_dict().items()})
    cl.to_channels_last()
    assert cl.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    latents = torch.randn(1, 4, 3, 4, 4)
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    assert rel_err(cl.decode(latents), ours.decode(latents)) < 1e-5
    assert rel_err(cl.encode(video), ours.encode(video)) < 1e-5


def test_bf16_decode_close_to_fp32(pair):
    """bf16 stays as close to float32 as diffusers' own bf16 decode does (~2.4 % here)."""
    ref, ours = pair
    bf16 = WanVAE.from_state_dict(ours.config, ours.state_dict(), dtype=torch.bfloat16)
    ref_bf16 = diffusers.AutoencoderKLWan(**ours.config.to_dict()).eval()
    ref_bf16.load_state_dict(ref.state_dict())
    ref_bf16.to(torch.bfloat16)
    latents = torch.randn(1, 4, 3, 4, 4)
    fp32 = ours.decode(latents)
    out = bf16.decode(latents)
    assert out.dtype == torch.bfloat16
    mean, std = stats(ours.config)
    with torch.no_grad():
        ref_out = ref_bf16.decode((latents / (1.0 / std) + mean).bfloat16()).sample
    err, ref_err = rel_err(out, fp32), rel_err(ref_out, fp32)
    assert err < 4e-2 and err < 1.1 * ref_err, (err, ref_err)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert rel_err(bf16.encode(video), ours.encode(video)) < 4e-2


# ---------------------------------------------------------------------------------------------
# Tiled decode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw,tile,overlap", [((60, 104), (32, 32), (8, 8)), ((12, 12), (8, 8), (4, 4)),
                                             ((13, 7), (5, 7), (2, 3)), ((9, 30), (9, 8), (0, 1))])
def test_plan_tiles_covers_with_overlaps(hw, tile, overlap):
    regions = plan_tiles(hw, tile, overlap)
    covered = torch.zeros(hw, dtype=torch.int32)
    for r in regions:
        assert 0 <= r.h0 < r.h1 <= hw[0] and 0 <= r.w0 < r.w1 <= hw[1]
        assert r.h1 - r.h0 <= tile[0] and r.w1 - r.w0 <= tile[1]
        covered[r.h0:r.h1, r.w0:r.w1] += 1
    assert bool((covered > 0).all())
    assert len({(r.h1 - r.h0, r.w1 - r.w0) for r in regions}) == 1  # one tile shape (ranks stack them)
    rows = sorted({(r.h0, r.h1, r.ramp_h) for r in regions})
    for (a0, a1, ra), (b0, b1, rb) in zip(rows, rows[1:]):
        assert a1 - b0 >= overlap[0] and ra[1] == rb[0] == a1 - b0  # ramps span the real overlap
    assert rows[0][2][0] == 0 and rows[-1][2][1] == 0  # no ramp at the image border
    assert plan_tiles(hw, tile, overlap) == regions  # deterministic (same on every rank)


def test_plan_tiles_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap < tile"):
        plan_tiles((16, 16), (8, 8), (8, 2))


@pytest.mark.parametrize("tile,overlap", [((8, 8), (4, 4)), ((5, 7), (2, 3)), ((6, 12), (1, 0))])
def test_blend_reassembles_exact_tiles(tile, overlap):
    """If every tile were exact (a crop of the full video), blending gives the full video back:
    the ramps form a partition of unity, in any tile order."""
    video = torch.rand(2, 3, 5, 12 * 8, 12 * 8) * 2 - 1
    regions = plan_tiles((12, 12), tile, overlap)
    pieces = [(r, video[..., r.h0 * 8:r.h1 * 8, r.w0 * 8:r.w1 * 8]) for r in regions]
    out = blend(pieces[::-1], (12, 12), 8)
    assert torch.allclose(out, video, atol=1e-6)
    with pytest.raises(ValueError, match="do not cover"):
        blend(pieces[:1], (12, 12), 8)


def test_blend_weights_are_linear_in_the_overlap():
    """Two constant tiles (0 and 1) overlapping: the seam is a linear ramp, not a step."""
    regions = plan_tiles((1, 12), (1, 8), (0, 4))
    assert [(r.w0, r.w1) for r in regions] == [(0, 8), (4, 12)]
    pieces = [(regions[0], torch.full((1, 1, 1, 8, 64), -0.5)), (regions[1], torch.full((1, 1, 1, 8, 64), 0.5))]
    row = blend(pieces, (1, 12), 8)[0, 0, 0, 0]
    seam = row[32:64]
    assert torch.allclose(seam.diff(), torch.full((31,), 1 / 32), atol=1e-6)
    assert torch.all(row[:32] == -0.5) and torch.all(row[64:] == 0.5)


def test_single_tile_equals_plain_decode(pair):
    _, ours = pair
    latents = torch.randn(1, 4, 2, 6, 5)
    assert torch.equal(tiled_decode(ours, latents, (8, 8), (2, 2)), ours.decode(latents))


# Measured on this tiny random-weight model (12x12 latent, 2 frames): tiled vs plain relative
# error 0.121 with 8x8-latent tiles overlapping by 4, 0.087 with 10x10 tiles overlapping by 6;
# diffusers' own tiled decode with the same geometry (64-px tiles, stride 32) is at 0.163.
# Random weights make the mid-block attention (global over each frame) and the ~17-latent-pixel
# conv receptive field weigh far more than trained weights do: these bound the machinery, they
# are not the quality of a real tiled decode (the blend itself is exact: see the tests above).
TILED_REL_ERR_BOUND = 0.15


def test_tiled_decode_close_to_plain_and_better_than_diffusers_tiling(pair):
    ref, ours = pair
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 2, 12, 12)
    plain = ours.decode(latents)
    tiled = tiled_decode(ours, latents, tile_latent=(8, 8), overlap_latent=(4, 4))
    assert tiled.shape == plain.shape
    err = rel_err(tiled, plain)
    assert 0 < err < TILED_REL_ERR_BOUND, err
    wider = rel_err(tiled_decode(ours, latents, (10, 10), (6, 6)), plain)
    assert wider < err  # more overlap, closer
    mean, std = stats(ours.config)
    ref.enable_tiling(64, 64, 32, 32)
    try:
        with torch.no_grad():
            ref_tiled = ref.decode(latents / (1.0 / std) + mean).sample
    finally:
        ref.use_tiling = False
    assert err < rel_err(ref_tiled, plain)


def test_tiles_by_rank_then_blend_equals_tiled_decode(pair):
    """The multi-GPU recipe in tiled_decode's docstring, with 3 fake ranks."""
    _, ours = pair
    latents = torch.randn(1, 4, 2, 12, 10)
    regions = plan_tiles((12, 10), (8, 6), (4, 2))
    world = 3
    per_rank = [[(i, decode_tile(ours, latents, regions[i])) for i in range(rank, len(regions), world)]
                for rank in range(world)]
    gathered = [piece for rank_pieces in per_rank for piece in rank_pieces]
    video = blend([(regions[i], px) for i, px in gathered], (12, 10), ours.config.spatial_scale)
    assert torch.allclose(video, tiled_decode(ours, latents, (8, 6), (4, 2)), atol=1e-6)


def test_tiling_attribute_selects_tiled_decode(pair):
    """`WanVAE.tiling` (set by the loader for EngineOptions.vae_tiling) makes `decode` tiled."""
    _, ours = pair
    latents = torch.randn(1, 4, 1, 36, 2)  # taller than one 32-latent tile
    plain = ours.decode(latents)
    ours.tiling = DEFAULT_TILING
    try:
        tiled = ours.decode(latents)
    finally:
        ours.tiling = None
    assert torch.equal(tiled, tiled_decode(ours, latents))
    assert not torch.equal(tiled, plain)
    assert torch.equal(plain, ours.decode_whole(latents))


def test_layout_helpers_keep_channels_last_without_copies():
    """The CUDA channels-last path (CPU convs do not return channels-last, so check directly)."""
    from engine.models.wan.vae import _frames_to_images, _images_to_frames, _interleave_time

    x = torch.randn(2, 6, 3, 4, 5)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    # time interleave: channel half j becomes frame 2t + j, as diffusers' stack/reshape
    halves = x.reshape(2, 2, 3, 3, 4, 5)
    expected = torch.stack((halves[:, 0], halves[:, 1]), 3).reshape(2, 3, 6, 4, 5)
    assert torch.equal(_interleave_time(x), expected)
    out = _interleave_time(cl)
    assert torch.equal(out, expected) and out.is_contiguous(memory_format=torch.channels_last_3d)
    # frames <-> images are views in channels-last
    images = _frames_to_images(cl)
    assert images.data_ptr() == cl.data_ptr() and images.is_contiguous(memory_format=torch.channels_last)
    back = _images_to_frames(images, 2)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last_3d)

"""The Wan2.2 VAE (TI2V-5B) in engine.models.wan.vae: parity with diffusers' `AutoencoderKLWan`
(is_residual, patch_size 2, z_dim 48) on the same random weights (float32, CPU), the official
`Wan2.2_VAE.pth` key map and config inference, channels-last, tiling and both split decodes (tiles;
halo rows over gloo ranks)."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import this file by basename

from engine.models.wan import keymap_vae  # noqa: E402
from engine.models.wan import vae as vae_module  # noqa: E402
from engine.models.wan.keymap_vae import (  # noqa: E402
    diffusers_to_official_vae22,
    infer_vae22_config,
    is_vae22_official,
    official_vae22_to_diffusers,
)
from engine.models.wan.vae import (  # noqa: E402
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    AvgDown3d,
    DupUp3d,
    WanVAE,
    WanVAEConfig,
    decode_tile,
    default_tiling,
    plan_tiles,
    tiled_decode,
    tiny_vae22_config,
    wan22_vae_config,
)
from engine.parallel.mesh import SINGLE, SubGroup  # noqa: E402
from engine.parallel.vae import split_decode  # noqa: E402
from engine.parallel.vae_halo import halo_split_decode  # noqa: E402

torch.set_num_threads(1)

REL_TOL = 1e-4
"""float32 parity with diffusers (measured 3e-7 encode, 6e-7 .. 9e-7 decode)."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def config22(**changes) -> WanVAEConfig:
    """The Wan2.2 design at tiny widths (z_dim 48 and the release's latent statistics kept);
    decoder_base_dim != base_dim as in the release."""
    return dataclasses.replace(wan22_vae_config(), **{"base_dim": 16, "decoder_base_dim": 24, **changes})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm gammas 1 + 0.2 N and biases 0.05 N, so swapped norms or biases show (conv weights keep
    their init: the RMS norms keep the activations at unit scale whatever the weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def build_vae22(config: WanVAEConfig | None = None) -> WanVAE:
    """Deterministic tiny Wan2.2 VAE (same weights in every process)."""
    torch.manual_seed(0)
    return randomize_(WanVAE(config or config22()).eval(), seed=3)


@pytest.fixture(scope="module")
def pair():
    """(diffusers reference, ours) with identical random weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = config22()
    ref = randomize_(diffusers.AutoencoderKLWan(**config.to_dict())).eval()
    ours = WanVAE(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def stats(config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, config.z_dim, 1, 1, 1)
    return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)


def reference_encode(ref, video: torch.Tensor, config: WanVAEConfig) -> torch.Tensor:
    """As diffusers' Wan pipelines: `retrieve_latents(..., sample_mode="argmax")` (the posterior
    mode), then (z - mean) * (1 / std)."""
    mean, std = stats(config)
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
    return (mu - mean) * (1.0 / std)


def reference_decode(ref, latents: torch.Tensor, config: WanVAEConfig) -> torch.Tensor:
    """As WanPipeline: latents / (1 / std) + mean, then decode (diffusers clamps to [-1, 1])."""
    mean, std = stats(config)
    with torch.no_grad():
        return ref.decode(latents / (1.0 / std) + mean).sample


def video_of(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents_of(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Structure and parity with diffusers
# ---------------------------------------------------------------------------------------------


def test_parameter_keys_and_shapes_equal_diffusers(pair):
    ref, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_release_config_equals_diffusers_on_meta():
    """The real TI2V-5B VAE (built on meta: no memory) has diffusers' keys and shapes."""
    diffusers = pytest.importorskip("diffusers")
    config = wan22_vae_config()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(**config.to_dict())
        ours = WanVAE(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(705e6, rel=0.01)
    assert (config.spatial_scale, config.temporal_scale, config.z_dim) == (16, 4, 48)
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == 48


@pytest.mark.parametrize("frames,height,width,batch", [(9, 64, 48, 1), (5, 32, 32, 2), (1, 32, 64, 1)])
def test_encode_matches_diffusers(pair, frames, height, width, batch):
    ref, ours = pair
    video = video_of((batch, 3, frames, height, width), seed=frames)
    expected = reference_encode(ref, video, ours.config)
    got = ours.encode(video)
    assert got.shape == (batch, 48, (frames - 1) // 4 + 1, height // 16, width // 16)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < REL_TOL


@pytest.mark.parametrize("latent_frames,h,w,batch", [(3, 2, 3, 1), (2, 2, 2, 2), (1, 3, 2, 1)])
def test_decode_matches_diffusers(pair, latent_frames, h, w, batch):
    ref, ours = pair
    latents = latents_of((batch, 48, latent_frames, h, w), seed=latent_frames)
    expected = reference_decode(ref, latents, ours.config)
    got = ours.decode(latents)
    assert got.shape == (batch, 3, 4 * (latent_frames - 1) + 1, 16 * h, 16 * w)
    assert (expected.abs() < 1).float().mean() > 0.9  # the comparison is not of clamped values
    assert rel_err(got, expected) < REL_TOL


def test_deliberate_mistakes_show(pair, monkeypatch):
    """The parity above is not vacuous: the (r, q) patch order swapped, or either residual
    shortcut dropped, moves the outputs by orders of magnitude more than the tolerance (measured
    0.19 .. 1.1)."""
    ref, ours = pair
    video = video_of((1, 3, 5, 32, 32), seed=11)
    latents = latents_of((1, 48, 2, 2, 2), seed=12)
    expected_z = reference_encode(ref, video, ours.config)
    expected_x = reference_decode(ref, latents, ours.config)

    with monkeypatch.context() as m:  # (c, q, r) instead of the official (c, r, q)
        patches = vae_module._pixel_patches
        m.setattr(vae_module, "_pixel_patches", lambda x, p: patches(x, p).transpose(2, 3))
        assert rel_err(ours.encode(video), expected_z) > 1000 * REL_TOL
        assert rel_err(ours.decode(latents), expected_x) > 1000 * REL_TOL
    with monkeypatch.context() as m:
        avg = AvgDown3d.forward
        m.setattr(AvgDown3d, "forward", lambda self, x: avg(self, x) * 0)
        assert rel_err(ours.encode(video), expected_z) > 1000 * REL_TOL
    with monkeypatch.context() as m:
        dup = DupUp3d.forward
        m.setattr(DupUp3d, "forward", lambda self, x, cache: dup(self, x, cache) * 0)
        assert rel_err(ours.decode(latents), expected_x) > 1000 * REL_TOL
    # and back to exact parity once restored
    assert rel_err(ours.encode(video), expected_z) < REL_TOL


def test_input_checks():
    vae = build_vae22()
    with pytest.raises(ValueError, match="frames must be 4k \\+ 1"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 1, 32, 40))
    with pytest.raises(ValueError, match="video must have 3 channels"):
        vae.encode(torch.zeros(1, 12, 1, 32, 32))
    with pytest.raises(ValueError, match="z_dim=48 channels"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))


def test_shortcut_channel_checks():
    with pytest.raises(ValueError, match="AvgDown3d: .* multiple of out_dim = 48"):
        AvgDown3d(20, 48, factor_t=1, factor_s=2)
    with pytest.raises(ValueError, match="DupUp3d: .* multiple of in_dim = 48"):
        DupUp3d(48, 20, factor_t=1, factor_s=2)


def test_tiny_model_config():
    """`tiny-wan2.2-ti2v`'s VAE: the release's design (z 48, patch 2, strides 4 x 16 x 16)."""
    config = tiny_vae22_config()
    assert config is not tiny_vae22_config()  # a fresh object each call
    assert (config.spatial_scale, config.temporal_scale, config.z_dim, config.patch_size) == (16, 4, 48, 2)
    assert config.is_residual and config.decoder_base_dim != config.base_dim
    vae = WanVAE(config).eval()
    assert sum(p.numel() for p in vae.parameters()) < 2e6
    latents = vae.encode(video_of((1, 3, 5, 32, 48), seed=1))
    assert latents.shape == (1, 48, 2, 2, 3)
    assert vae.decode(latents).shape == (1, 3, 5, 32, 48)


# ---------------------------------------------------------------------------------------------
# Official Wan2.2_VAE.pth layout
# ---------------------------------------------------------------------------------------------


def official_keys22(config: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    """Official Wan2.2 VAE key -> shape, written from the official module layout
    (Wan-Video/Wan2.2 wan/modules/vae2_2.py: `Down_ResidualBlock.downsamples`,
    `Up_ResidualBlock.upsamples`), independently of keymap_vae."""
    keys: dict[str, tuple[int, ...]] = {}
    z, nres, cin_px = config.z_dim, config.num_res_blocks, config.in_channels

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

    last = len(config.dim_mult) - 1
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    conv("encoder.conv1", cin_px, dims[0], (3, 3, 3))
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(nres):
            residual(f"encoder.downsamples.{level}.downsamples.{j}", cin, cout)
            cin = cout
        if level != last:
            conv(f"encoder.downsamples.{level}.downsamples.{nres}.resample.1", cout, cout, (3, 3))
            if config.temperal_downsample[level]:
                conv(f"encoder.downsamples.{level}.downsamples.{nres}.time_conv", cout, cout, (3, 1, 1))
    middle("encoder", dims[-1])
    keys["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", dims[-1], 2 * z, (3, 3, 3))
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))

    dims = [config.decoder_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
    up_time = tuple(reversed(config.temperal_downsample))
    conv("decoder.conv1", z, dims[0], (3, 3, 3))
    middle("decoder", dims[0])
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(nres + 1):
            residual(f"decoder.upsamples.{level}.upsamples.{j}", cin, cout)
            cin = cout
        if level != last:  # upsamplers keep the channels in Wan2.2
            conv(f"decoder.upsamples.{level}.upsamples.{nres + 1}.resample.1", cout, cout, (3, 3))
            if up_time[level]:
                conv(f"decoder.upsamples.{level}.upsamples.{nres + 1}.time_conv", cout, 2 * cout, (3, 1, 1))
    keys["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", dims[-1], config.out_channels, (3, 3, 3))
    return keys


# Read once off the official module itself (Wan-Video/Wan2.2 wan/modules/vae2_2.py `WanVAE_` with
# dim 8, dec_dim 12, z_dim 48, num_res_blocks 1 = tiny_vae22_config(): 148 entries; the release
# size, dim 160, dec_dim 256, num_res_blocks 2: 196 entries).
OFFICIAL_TINY_COUNT, OFFICIAL_RELEASE_COUNT = 148, 196
OFFICIAL_TINY_SAMPLE = [
    ("encoder.conv1.weight", (8, 12, 3, 3, 3)),
    ("encoder.downsamples.0.downsamples.1.resample.1.weight", (8, 8, 3, 3)),
    ("encoder.downsamples.1.downsamples.0.shortcut.weight", (16, 8, 1, 1, 1)),
    ("encoder.downsamples.1.downsamples.1.time_conv.weight", (16, 16, 3, 1, 1)),
    ("encoder.downsamples.3.downsamples.0.residual.6.weight", (32, 32, 3, 3, 3)),
    ("encoder.head.2.weight", (96, 32, 3, 3, 3)),
    ("conv1.weight", (96, 96, 1, 1, 1)),
    ("conv2.weight", (48, 48, 1, 1, 1)),
    ("decoder.conv1.weight", (48, 48, 3, 3, 3)),
    ("decoder.upsamples.0.upsamples.1.residual.0.gamma", (48, 1, 1, 1)),
    ("decoder.upsamples.0.upsamples.2.time_conv.weight", (96, 48, 3, 1, 1)),
    ("decoder.upsamples.1.upsamples.2.resample.1.weight", (48, 48, 3, 3)),
    ("decoder.upsamples.2.upsamples.0.shortcut.weight", (24, 48, 1, 1, 1)),
    ("decoder.upsamples.2.upsamples.2.resample.1.bias", (24,)),
    ("decoder.upsamples.3.upsamples.1.residual.2.weight", (12, 12, 3, 3, 3)),
    ("decoder.head.2.weight", (12, 12, 3, 3, 3)),
]


def test_official_key_list_is_the_official_modules():
    tiny = official_keys22(tiny_vae22_config())
    assert len(tiny) == OFFICIAL_TINY_COUNT
    assert len(official_keys22(wan22_vae_config())) == OFFICIAL_RELEASE_COUNT
    for key, shape in OFFICIAL_TINY_SAMPLE:
        assert tiny[key] == shape, key
    assert not any(".downsamples.3.downsamples.1." in k or ".upsamples.3.upsamples.2." in k for k in tiny)


@pytest.mark.parametrize("config", [tiny_vae22_config(), config22(), wan22_vae_config()],
                         ids=["tiny", "parity", "release"])
def test_official_keys_map_onto_our_module(config):
    shapes = official_keys22(config)
    mapped = official_vae22_to_diffusers(shapes)
    with torch.device("meta"):
        ours = WanVAE(config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == mapped
    assert diffusers_to_official_vae22(mapped) == shapes


def test_official_key_map_matches_diffusers_conversion():
    """Spot checks against diffusers' scripts/convert_wan_to_diffusers.py `convert_vae_22`."""
    mapped = official_vae22_to_diffusers({k: k for k in official_keys22(wan22_vae_config())})
    expected = {
        "encoder.down_blocks.0.resnets.1.norm2.gamma": "encoder.downsamples.0.downsamples.1.residual.3.gamma",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.downsamples.1.downsamples.0.shortcut.weight",
        "encoder.down_blocks.1.downsampler.time_conv.bias": "encoder.downsamples.1.downsamples.2.time_conv.bias",
        "encoder.down_blocks.0.downsampler.resample.1.weight": "encoder.downsamples.0.downsamples.2.resample.1.weight",
        "decoder.up_blocks.0.resnets.2.conv2.weight": "decoder.upsamples.0.upsamples.2.residual.6.weight",
        "decoder.up_blocks.0.upsampler.time_conv.weight": "decoder.upsamples.0.upsamples.3.time_conv.weight",
        "decoder.up_blocks.2.upsampler.resample.1.bias": "decoder.upsamples.2.upsamples.3.resample.1.bias",
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": "decoder.upsamples.3.upsamples.0.shortcut.weight",
        "decoder.mid_block.attentions.0.to_qkv.weight": "decoder.middle.1.to_qkv.weight",
        "encoder.mid_block.resnets.1.conv1.bias": "encoder.middle.2.residual.2.bias",
        "encoder.conv_in.weight": "encoder.conv1.weight",
        "decoder.norm_out.gamma": "decoder.head.0.gamma",
        "quant_conv.weight": "conv1.weight",
        "post_quant_conv.bias": "conv2.bias",
    }
    for ours_key, official_key in expected.items():
        assert mapped[ours_key] == official_key


def test_official_round_trip_and_loading_give_the_same_vae():
    """A diffusers-keyed random state dict -> official names -> back is itself (the very
    tensors); loaded from the official names through the map, the VAE computes the same."""
    vae = build_vae22()
    sd = vae.state_dict()
    official = diffusers_to_official_vae22(sd)
    assert set(official) == set(official_keys22(vae.config))
    back = official_vae22_to_diffusers(official)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    loaded = WanVAE.from_state_dict(vae.config, official_vae22_to_diffusers(official))
    video, latents = video_of((1, 3, 5, 32, 32), seed=3), latents_of((1, 48, 2, 2, 3), seed=4)
    assert torch.equal(loaded.encode(video), vae.encode(video))
    assert torch.equal(loaded.decode(latents), vae.decode(latents))


def test_is_vae22_official_tells_the_layouts_apart():
    official22 = official_keys22(tiny_vae22_config())
    assert is_vae22_official(official22)
    wan21 = WanVAEConfig(base_dim=8, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    with torch.device("meta"):
        diffusers21 = WanVAE(wan21).state_dict()
        diffusers22 = WanVAE(tiny_vae22_config()).state_dict()
    assert not is_vae22_official(keymap_vae.diffusers_to_official(diffusers21))  # official Wan2.1
    assert not is_vae22_official(diffusers21)
    assert not is_vae22_official(diffusers22)
    with pytest.raises(ValueError, match="unknown Wan2.2 VAE key"):
        official_vae22_to_diffusers({"encoder.downsamples.0.downsamples.0.mystery.weight": 0})


def test_infer_vae22_config():
    with torch.device("meta"):
        release = WanVAE(wan22_vae_config()).state_dict()
        tiny = WanVAE(tiny_vae22_config()).state_dict()
    assert infer_vae22_config(release) == wan22_vae_config()
    assert infer_vae22_config(official_vae22_to_diffusers(official_keys22(tiny_vae22_config()))) \
        == tiny_vae22_config()  # from bare shapes too
    assert infer_vae22_config(tiny) == tiny_vae22_config()
    mean, std = (0.1,) * 8, (2.0,) * 8
    small = config22(z_dim=8, latents_mean=mean, latents_std=std)
    with torch.device("meta"):
        small_sd = WanVAE(small).state_dict()
    assert infer_vae22_config(small_sd, mean, std) == small
    with pytest.raises(ValueError, match="z_dim=8: pass latents_mean and latents_std"):
        infer_vae22_config(small_sd)
    with pytest.raises(ValueError, match="'encoder.conv_in.weight' is missing"):
        infer_vae22_config({k: v for k, v in tiny.items() if k != "encoder.conv_in.weight"})


# ---------------------------------------------------------------------------------------------
# Speed paths, tiling, split decodes
# ---------------------------------------------------------------------------------------------


def test_channels_last_matches():
    vae, fast = build_vae22(), build_vae22().to_channels_last()
    video, latents = video_of((1, 3, 5, 32, 48), seed=5), latents_of((1, 48, 2, 3, 2), seed=6)
    assert rel_err(fast.encode(video), vae.encode(video)) < 1e-5
    assert rel_err(fast.decode(latents), vae.decode(latents)) < 1e-5


def test_bf16_decode_close_to_fp32():
    vae = build_vae22()
    latents = latents_of((1, 48, 2, 2, 2), seed=7)
    assert rel_err(build_vae22().to(torch.bfloat16).decode(latents), vae.decode(latents)) < 0.05


TILED_REL_ERR_BOUND = 0.45
"""Tiled vs plain decode, 6x6 latent in 4x4 tiles overlapping by 2, measured 0.39: random weights
exaggerate the tiles' border effects (global mid-block attention, wide receptive field). For
scale: another latent's decode is 0.84 away, the plain decode mirrored 1.41."""


def test_tiling_at_scale_16():
    vae = build_vae22()
    latents = latents_of((1, 48, 2, 6, 6), seed=8)
    plain = vae.decode(latents)
    # one tile covering everything is the plain decode
    whole = plan_tiles((6, 6), (6, 6), (1, 1))
    assert len(whole) == 1 and torch.equal(decode_tile(vae, latents, whole[0]).clamp(-1, 1), plain)
    # 4 tiles of 64x64 pixels blended at 16 pixels per latent pixel; one rank's split is the same
    tiled = tiled_decode(vae, latents, (4, 4), (2, 2))
    assert tiled.shape == plain.shape == (1, 3, 5, 96, 96)
    assert rel_err(tiled, plain) < TILED_REL_ERR_BOUND
    assert torch.allclose(split_decode(vae, latents, SINGLE, (4, 4), (2, 2)), tiled, atol=1e-6)
    vae.tiling = ((4, 4), (2, 2))
    assert torch.equal(vae.decode(latents), tiled)
    assert default_tiling(vae.config) == ((16, 16), (4, 4))
    assert default_tiling(WanVAEConfig()) == vae_module.DEFAULT_TILING


HALO_CASES = {  # name: (latent shape, channels_last)
    "h3_rows_2_1": ((1, 48, 2, 3, 2), False),
    "h4_channels_last": ((1, 48, 3, 4, 3), True),
}


def _halo_rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Spawned rank: halo-split-decode every case over the world; rank 0 saves the videos."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        group = SubGroup(dist.group.WORLD, world_size, rank)
        for name, (shape, channels_last) in HALO_CASES.items():
            vae = build_vae22().to_channels_last() if channels_last else build_vae22()
            video = halo_split_decode(vae, latents_of(shape, seed=sum(shape)), group)
            if video is not None:
                torch.save(video, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


def test_halo_split_decode_equals_plain_decode(tmp_path):
    import test_vae22 as this  # the children find _halo_rank_main under this name

    vae = build_vae22()
    single = latents_of((1, 48, 2, 3, 2), seed=9)
    assert rel_err(halo_split_decode(vae, single, SINGLE), vae.decode(single)) < 1e-5
    mp.spawn(this._halo_rank_main, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    for name, (shape, _) in HALO_CASES.items():
        plain = vae.decode(latents_of(shape, seed=sum(shape)))
        video = torch.load(tmp_path / f"{name}.pt")
        assert video.shape == plain.shape == (1, 3, 4 * (shape[2] - 1) + 1, 16 * shape[3], 16 * shape[4])
        assert rel_err(video, plain) < 1e-5, name

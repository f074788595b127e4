"""Key maps between the official Wan VAEs (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`) and diffusers'
`AutoencoderKLWan` (= our `WanVAE`). Pure functions on state dicts; the tensors are passed through
untouched. `is_vae22_official` tells the two official layouts apart.

Official layout (Wan-Video/Wan2.1 `wan/modules/vae.py`):
  conv1 / conv2                       quant / post-quant 1x1x1 convs
  {encoder,decoder}.conv1             stem conv
  {encoder,decoder}.middle.{0,1,2}    residual, attention, residual
  {encoder,decoder}.head.{0,2}        RMS norm, conv (1 is the SiLU)
  encoder.downsamples.N               flat list: residual blocks and resamplers (same order as ours)
  decoder.upsamples.N                 flat list: per level num_res_blocks+1 residual blocks, then
                                      one resampler (none after the last level)
  residual blocks: residual.{0: norm1, 2: conv1, 3: norm2, 6: conv2}, shortcut

Official Wan2.2 layout (Wan-Video/Wan2.2 `wan/modules/vae2_2.py`; diffusers'
scripts/convert_wan_to_diffusers.py `convert_vae_22`): stems, middle, head and the quant convs as
Wan2.1; the blocks are nested per level:
  encoder.downsamples.L.downsamples.j   j < num_res_blocks: residual block j ->
                                        encoder.down_blocks.L.resnets.j; then the resampler
                                        (resample.1 / time_conv) -> encoder.down_blocks.L.downsampler
  decoder.upsamples.L.upsamples.j       j <= num_res_blocks: decoder.up_blocks.L.resnets.j; then
                                        the resampler -> decoder.up_blocks.L.upsampler
  (the levels' AvgDown3D / DupUp3D shortcuts have no parameters)
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

if TYPE_CHECKING:
    from engine.models.wan.vae import WanVAEConfig

T = TypeVar("T")

# Key prefixes shared by Wan2.1 and Wan2.2, (official, diffusers); {part} is encoder/decoder.
_COMMON = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("{part}.conv1.", "{part}.conv_in."),
    ("{part}.head.0.", "{part}.norm_out."),
    ("{part}.head.2.", "{part}.conv_out."),
    ("{part}.middle.0.", "{part}.mid_block.resnets.0."),
    ("{part}.middle.1.", "{part}.mid_block.attentions.0."),
    ("{part}.middle.2.", "{part}.mid_block.resnets.1."),
]
# Wan2.1, (official, diffusers); {n} a block index.
_PREFIXES = _COMMON + [("encoder.downsamples.{n}.", "encoder.down_blocks.{n}.")]
# Inside residual blocks, (official, diffusers); these fragments occur nowhere else.
_RESIDUAL = [
    (".residual.0.", ".norm1."),
    (".residual.2.", ".conv1."),
    (".residual.3.", ".norm2."),
    (".residual.6.", ".conv2."),
    (".shortcut.", ".conv_shortcut."),
]


def official_to_diffusers(state_dict: Mapping[str, T], num_res_blocks: int | None = None) -> dict[str, T]:
    """Official `Wan2.1_VAE.pth` keys -> diffusers/WanVAE keys. `num_res_blocks` (2 for every Wan
    release) is read from the decoder's layout when not given."""
    if num_res_blocks is None:
        num_res_blocks = _num_res_blocks_official(state_dict)
    per_level = num_res_blocks + 2  # residual blocks, then one resampler

    def rename(key: str) -> str:
        key = _rename_prefix(key, _PREFIXES)
        if m := re.match(r"decoder\.upsamples\.(\d+)\.", key):
            # decoder.upsamples.N (flat) -> decoder.up_blocks.L.{resnets.i | upsamplers.0}
            level, pos = divmod(int(m.group(1)), per_level)
            inner = f"resnets.{pos}" if pos <= num_res_blocks else "upsamplers.0"
            key = f"decoder.up_blocks.{level}.{inner}." + key[m.end():]
        for old, new in _RESIDUAL:
            key = key.replace(old, new)
        return key

    return _renamed(state_dict, rename)


def diffusers_to_official(state_dict: Mapping[str, T], num_res_blocks: int | None = None) -> dict[str, T]:
    """The inverse of `official_to_diffusers`."""
    if num_res_blocks is None:
        num_res_blocks = _num_res_blocks_diffusers(state_dict)
    per_level = num_res_blocks + 2

    def rename(key: str) -> str:
        # (residual names first: ".conv1." must not meet the stem's official "encoder.conv1.")
        for old, new in _RESIDUAL:
            key = key.replace(new, old)
        key = _rename_prefix(key, [(new, old) for old, new in _PREFIXES])
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.", key):
            pos = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
            key = f"decoder.upsamples.{int(m.group(1)) * per_level + pos}." + key[m.end():]
        return key

    return _renamed(state_dict, rename)


# ---------------------------------------------------------------------------------------------
# Wan2.2
# ---------------------------------------------------------------------------------------------

# Per part: (official list name, diffusers list name, diffusers resampler name).
_NESTED = {"encoder": ("downsamples", "down_blocks", "downsampler"),
           "decoder": ("upsamples", "up_blocks", "upsampler")}
_OFFICIAL_NESTED = re.compile(r"(encoder)\.downsamples\.(\d+)\.downsamples\.(\d+)\.|"
                              r"(decoder)\.upsamples\.(\d+)\.upsamples\.(\d+)\.")
_DIFFUSERS_NESTED = re.compile(r"(encoder|decoder)\.(?:down_blocks|up_blocks)\.(\d+)\."
                               r"(?:resnets\.(\d+)|(downsampler|upsampler))\.")


def is_vae22_official(state_dict: Mapping[str, object]) -> bool:
    """True for official Wan2.2 VAE keys (blocks nested per level, e.g.
    `encoder.downsamples.0.downsamples.0.residual.0.gamma`), False for Wan2.1's flat official
    layout (`encoder.downsamples.0.residual.0.gamma`) and for diffusers keys."""
    return any(_OFFICIAL_NESTED.match(key) for key in state_dict)


def official_vae22_to_diffusers(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Official `Wan2.2_VAE.pth` keys -> diffusers/WanVAE keys (as diffusers' `convert_vae_22`:
    a nested entry holding residual/shortcut weights is a residual block, one holding
    resample/time_conv weights the level's resampler)."""

    def rename(key: str) -> str:
        if m := _OFFICIAL_NESTED.match(key):
            part, level, j = m.group(1, 2, 3) if m.group(1) else m.group(4, 5, 6)
            _, blocks, resampler = _NESTED[part]
            rest = key[m.end():]
            if rest.startswith(("residual.", "shortcut.")):
                key = f"{part}.{blocks}.{level}.resnets.{j}.{rest}"
            elif rest.startswith(("resample.", "time_conv.")):
                key = f"{part}.{blocks}.{level}.{resampler}.{rest}"
            else:
                raise ValueError(f"unknown Wan2.2 VAE key {key!r}: a nested block entry must hold "
                                 "residual/shortcut (residual block) or resample/time_conv (resampler)")
        else:
            key = _rename_prefix(key, _COMMON)
        for old, new in _RESIDUAL:
            key = key.replace(old, new)
        return key

    return _renamed(state_dict, rename)


def diffusers_to_official_vae22(state_dict: Mapping[str, T]) -> dict[str, T]:
    """The inverse of `official_vae22_to_diffusers` (a level's resampler follows its residual
    blocks in the official nested list)."""
    resnets: dict[tuple[str, str], int] = {}  # (part, level) -> residual blocks in that level
    for key in state_dict:
        if (m := _DIFFUSERS_NESTED.match(key)) and m.group(3) is not None:
            part_level = (m.group(1), m.group(2))
            resnets[part_level] = max(resnets.get(part_level, 0), int(m.group(3)) + 1)

    def rename(key: str) -> str:
        # (residual names first: ".conv1." must not meet the stem's official "encoder.conv1.")
        for old, new in _RESIDUAL:
            key = key.replace(new, old)
        if m := _DIFFUSERS_NESTED.match(key):
            part, level = m.group(1), m.group(2)
            j = m.group(3) if m.group(3) is not None else resnets.get((part, level), 0)
            official = _NESTED[part][0]
            return f"{part}.{official}.{level}.{official}.{j}." + key[m.end():]
        return _rename_prefix(key, [(new, old) for old, new in _COMMON])

    return _renamed(state_dict, rename)


def infer_vae22_config(state_dict: Mapping[str, Any], latents_mean: Sequence[float] | None = None,
                       latents_std: Sequence[float] | None = None) -> "WanVAEConfig":
    """The Wan2.2 `WanVAEConfig` read off diffusers-keyed tensors (or shapes), e.g.
    `official_vae22_to_diffusers(torch.load("Wan2.2_VAE.pth"))`: the official file has no config.

    Widths, levels, residual blocks, temporal downsampling and the pixel patch come from the
    shapes; the latent statistics are not in the weights: `latents_mean` / `latents_std`, or, for
    z_dim 48, the Wan2.2 release's (WAN22_LATENTS_MEAN / _STD).
    """
    from engine.models.wan.vae import VIDEO_CHANNELS, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAEConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"cannot read the Wan2.2 VAE structure: {key!r} is missing")
        value = state_dict[key]
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    base_dim, in_channels = shape("encoder.conv_in.weight")[:2]
    z_dim = shape("post_quant_conv.weight")[0]
    levels = sorted({int(m.group(1)) for k in state_dict
                     if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"cannot read the Wan2.2 VAE structure: encoder levels {levels}")
    # 1. per level: width (first residual block's output) and temporal downsampling
    dim_mult = []
    for level in levels:
        width = shape(f"encoder.down_blocks.{level}.resnets.0.conv1.weight")[0]
        if width % base_dim:
            raise ValueError(f"cannot read the Wan2.2 VAE structure: level {level} width {width} "
                             f"is not a multiple of base_dim {base_dim}")
        dim_mult.append(width // base_dim)
    temporal = tuple(f"encoder.down_blocks.{level}.downsampler.time_conv.weight" in state_dict
                     for level in levels[:-1])
    num_res_blocks = len({k.split(".")[4] for k in state_dict
                          if k.startswith("encoder.down_blocks.0.resnets.")})
    # 2. decoder width and the pixel patch (in_channels = 3 p^2)
    decoder_base_dim = shape("decoder.conv_in.weight")[0] // dim_mult[-1]
    patch = math.isqrt(in_channels // VIDEO_CHANNELS)
    if VIDEO_CHANNELS * patch * patch != in_channels:
        raise ValueError(f"cannot read the pixel patch: encoder input channels {in_channels} are "
                         f"not {VIDEO_CHANNELS} * patch**2")
    # 3. latent statistics
    if latents_mean is None or latents_std is None:
        if z_dim != len(WAN22_LATENTS_MEAN):
            raise ValueError(f"z_dim={z_dim}: pass latents_mean and latents_std (the Wan2.2 release's "
                             f"statistics are for z_dim {len(WAN22_LATENTS_MEAN)})")
        latents_mean, latents_std = WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
    return WanVAEConfig(
        base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult),
        num_res_blocks=num_res_blocks, temperal_downsample=temporal, latents_mean=tuple(latents_mean),
        latents_std=tuple(latents_std), is_residual=True, in_channels=in_channels,
        out_channels=shape("decoder.conv_out.weight")[0], patch_size=patch if patch > 1 else None,
        scale_factor_temporal=2 ** sum(temporal), scale_factor_spatial=2 ** (len(levels) - 1) * patch,
    )


# ---------------------------------------------------------------------------------------------


def _rename_prefix(key: str, prefixes: list[tuple[str, str]]) -> str:
    """Replace the first matching prefix template (with {part}/{n} placeholders)."""
    for src, dst in prefixes:
        pattern = re.escape(src).replace(r"\{part\}", "(?P<part>encoder|decoder)")
        pattern = pattern.replace(r"\{n\}", r"(?P<n>\d+)")
        if m := re.match(pattern, key):
            return dst.format(**m.groupdict()) + key[m.end():]
    return key


def _renamed(state_dict: Mapping[str, T], rename: Callable[[str], str]) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            raise ValueError(f"VAE key map sends two keys to {new!r} (second: {key!r})")
        out[new] = value
    return out


def _num_res_blocks_official(state_dict: Mapping[str, object]) -> int:
    """The first decoder resampler sits at index num_res_blocks + 1."""
    indices = [int(m.group(1)) for k in state_dict
               if (m := re.match(r"^decoder\.upsamples\.(\d+)\.(resample|time_conv)\.", k))]
    if not indices:
        raise ValueError("cannot read num_res_blocks from the official VAE keys (no decoder "
                         "resampler found); pass num_res_blocks explicitly")
    return min(indices) - 1


def _num_res_blocks_diffusers(state_dict: Mapping[str, object]) -> int:
    """The decoder's first level has num_res_blocks + 1 residual blocks."""
    indices = [int(m.group(1)) for k in state_dict
               if (m := re.match(r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    if not indices:
        raise ValueError("cannot read num_res_blocks from the VAE keys (no decoder.up_blocks.0); "
                         "pass num_res_blocks explicitly")
    return max(indices)

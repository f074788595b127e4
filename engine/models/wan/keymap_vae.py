"""Key map between the official Wan2.1 VAE (`Wan2.1_VAE.pth`) and diffusers' `AutoencoderKLWan`
(= our `WanVAE`). Pure functions on state dicts; the tensors are passed through untouched.

Official layout (Wan-Video/Wan2.1 `wan/modules/vae.py`):
  conv1 / conv2                       quant / post-quant 1x1x1 convs
  {encoder,decoder}.conv1             stem conv
  {encoder,decoder}.middle.{0,1,2}    residual, attention, residual
  {encoder,decoder}.head.{0,2}        RMS norm, conv (1 is the SiLU)
  encoder.downsamples.N               flat list: residual blocks and resamplers (same order as ours)
  decoder.upsamples.N                 flat list: per level num_res_blocks+1 residual blocks, then
                                      one resampler (none after the last level)
  residual blocks: residual.{0: norm1, 2: conv1, 3: norm2, 6: conv2}, shortcut
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")

# Key prefixes, (official, diffusers); {part} is encoder/decoder, {n} a block index.
_PREFIXES = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("{part}.conv1.", "{part}.conv_in."),
    ("{part}.head.0.", "{part}.norm_out."),
    ("{part}.head.2.", "{part}.conv_out."),
    ("{part}.middle.0.", "{part}.mid_block.resnets.0."),
    ("{part}.middle.1.", "{part}.mid_block.attentions.0."),
    ("{part}.middle.2.", "{part}.mid_block.resnets.1."),
    ("encoder.downsamples.{n}.", "encoder.down_blocks.{n}."),
]
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

"""The Wan video VAEs: causal 3-D convolutions, decoded chunk by chunk with a feature cache.

A re-implementation of diffusers' `AutoencoderKLWan` (0.42.1) with the SAME parameter keys, so a
diffusers `vae/` folder loads with no key map (the official `.pth` files go through keymap_vae.py).
One module family, two designs, chosen by the config:
  * Wan2.1 (every Wan2.1 model and Wan2.2 A14B): base_dim 96, z_dim 16, compression 4x8x8;
  * Wan2.2 (TI2V-5B; `wan22_vae_config()`): base_dim 160, decoder_base_dim 256, z_dim 48,
    compression 4x16x16. The pixels are patchified 2x2 into 12 channels before the encoder and
    unpatchified after the decoder; each encoder / decoder level is one residual block group with
    a parameter-free shortcut around it (`AvgDown3d`: channel-group averages of the space-time
    neighbourhood; `DupUp3d`: the reverse, by duplication); the decoder's upsamplers keep the
    channel count (Wan2.1's halve it).

Time is causal: frame t only sees frames <= t. The encoder runs on frame 0 alone, then on
4-frame chunks; the decoder on one latent frame at a time. Each causal layer remembers the
last frames it saw in a `CausalCache` that lives for ONE encode/decode call only (nothing is
stored on the modules, so concurrent calls cannot leak into each other).

Differences from diffusers, all for speed, none changing the maths (see the parity tests):
  * causal conv: the spatial zero padding is done by the convolution itself (no `F.pad` copy);
    the past frames are joined to the chunk in ONE copy (diffusers: `cat` then `pad`), and the
    frames kept for the next chunk are cloned only when that frees memory;
  * the decoded chunks are written into one preallocated output (diffusers re-`cat`s the growing
    output for every frame: quadratic copying), clamped in place;
  * everything stays in the model dtype: RMS norm reduces in float32 without materialising a
    float32 copy of the activations, the nearest upsampling runs in the model dtype (exact in any
    dtype); SiLU and residual additions run in place on fresh tensors;
  * `WanVAE.to_channels_last()` switches convolutions to channels-last-3d (cuDNN's fast layout
    for bf16); the per-frame 2-D convolutions then reshape without copies.
Spatial tiling for bounded memory (`tiled_decode`, built on `plan_tiles`/`decode_tile`/`blend`)
is at the bottom of this file.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
"""Wan2.2 (TI2V-5B) VAE, 48 latent channels: official `Wan2_2_VAE` (wan/modules/vae2_2.py) =
diffusers' `vae22_diffusers_config` (scripts/convert_wan_to_diffusers.py)."""
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
VIDEO_CHANNELS = 3
"""RGB: the pixel channels of `encode`'s input and `decode`'s output (before patchifying)."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class WanVAEConfig:
    """Field names equal diffusers' `AutoencoderKLWan` config.json keys. The defaults are Wan2.1's;
    `wan22_vae_config()` is Wan2.2's."""

    base_dim: int = 96
    """Channels of the first encoder level (x dim_mult per level)."""
    decoder_base_dim: int | None = None
    """Channels of the decoder's last level (x dim_mult per level); None means base_dim.
    Wan2.2: 256 (base_dim 160)."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; len - 1 spatial 2x down/up-samplings."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (decoder: one more)."""
    attn_scales: tuple[float, ...] = ()
    """Levels with extra attention blocks; empty in every Wan release (only () is supported)."""
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    """Per down-sampling level: also halve time? (sic: diffusers' spelling)."""
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    """Per-channel mean of the raw latents (normalised latents = (z - mean) / std)."""
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    """Per-channel std of the raw latents."""
    is_residual: bool = False
    """Wan2.2: each level is a `ResidualDownBlock` / `ResidualUpBlock` (parameter-free shortcuts
    around the level; upsamplers keep the channel count)."""
    in_channels: int = 3
    """Encoder input channels: 3 * patch**2 (Wan2.2: 12)."""
    out_channels: int = 3
    """Decoder output channels: 3 * patch**2 (Wan2.2: 12)."""
    patch_size: int | None = None
    """Wan2.2: 2 (pixels patchified 2x2 into channels around the encoder / decoder); None: 1."""
    scale_factor_temporal: int | None = 4
    """Informative (as in diffusers' pipelines); must equal `temporal_scale` when given."""
    scale_factor_spatial: int | None = 8
    """Informative (as in diffusers' pipelines); must equal `spatial_scale` when given."""

    def __post_init__(self) -> None:
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.attn_scales = tuple(float(s) for s in self.attn_scales)
        self.temperal_downsample = tuple(bool(t) for t in self.temperal_downsample)
        self.latents_mean = tuple(float(m) for m in self.latents_mean)
        self.latents_std = tuple(float(s) for s in self.latents_std)
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temperal_downsample)}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} needs z_dim = {self.z_dim} entries, got {len(getattr(self, name))}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanVAEConfig":
        """From a diffusers config.json dict; unknown and `_`-prefixed keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and not k.startswith("_")})

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (lists), loadable by diffusers' `AutoencoderKLWan.from_config`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check_supported(self) -> None:
        """Raise (naming the field and the allowed values) for options no Wan VAE uses or that
        contradict each other. The residual shortcuts check their channel counts when built."""
        if self.attn_scales:
            raise NotImplementedError(f"attn_scales must be () (no Wan VAE uses it), got {self.attn_scales}")
        if self.patch_size is not None and (not isinstance(self.patch_size, int) or self.patch_size < 1):
            raise ValueError(f"patch_size must be None or a positive int (Wan2.2: 2), "
                             f"got {self.patch_size!r}")
        channels = VIDEO_CHANNELS * self.patch**2
        if (self.in_channels, self.out_channels) != (channels, channels):
            raise ValueError(
                f"in_channels and out_channels must be {VIDEO_CHANNELS} * patch_size**2 = {channels} "
                f"(RGB pixels patchified {self.patch}x{self.patch}), got in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}"
            )
        for name, value, expected in (
            ("scale_factor_spatial", self.scale_factor_spatial, self.spatial_scale),
            ("scale_factor_temporal", self.scale_factor_temporal, self.temporal_scale),
        ):
            if value is not None and value != expected:
                raise ValueError(f"{name}={value} contradicts the layout (dim_mult, temperal_downsample, "
                                 f"patch_size), which gives {expected}; allowed: {expected} or None")

    @property
    def patch(self) -> int:
        """Pixel patch side (1 for Wan2.1, 2 for Wan2.2)."""
        return self.patch_size or 1

    @property
    def decoder_dim(self) -> int:
        """`decoder_base_dim`, or `base_dim` when unset."""
        return self.decoder_base_dim if self.decoder_base_dim is not None else self.base_dim

    @property
    def temporal_scale(self) -> int:
        """Pixel frames per latent frame (after the first): 4 for every Wan VAE."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel along H and W: 8 for Wan2.1, 16 for Wan2.2."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch


def wan22_vae_config() -> WanVAEConfig:
    """The Wan2.2 TI2V-5B VAE (diffusers' `vae22_diffusers_config`, official `Wan2_2_VAE`)."""
    return WanVAEConfig(
        base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
        temperal_downsample=(False, True, True), latents_mean=WAN22_LATENTS_MEAN,
        latents_std=WAN22_LATENTS_STD, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    )


TINY_VAE22 = dict(base_dim=8, decoder_base_dim=12, num_res_blocks=1)
"""What the built-in tiny Wan2.2 model (`tiny-wan2.2-ti2v`) changes in `wan22_vae_config()`:
narrow levels and one residual block per level; the real z_dim 48 and latent statistics, patch 2,
strides 4 x 16 x 16."""


def tiny_vae22_config() -> WanVAEConfig:
    """The tiny Wan2.2 VAE of `tiny-wan2.2-ti2v` (a new object each call)."""
    return dataclasses.replace(wan22_vae_config(), **TINY_VAE22)


# ---------------------------------------------------------------------------------------------
# Per-call causal cache
# ---------------------------------------------------------------------------------------------


class CausalCache:
    """The last input frames each causal layer saw, for ONE encode or decode call.

    Keyed by the layer object (diffusers counts layers through a shared index list instead).
    `seen(layer)` is False before the layer's first chunk.
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, Tensor | None] = {}

    def seen(self, layer: nn.Module) -> bool:
        return layer in self._frames

    def get(self, layer: nn.Module) -> Tensor | None:
        return self._frames.get(layer)

    def put(self, layer: nn.Module, frames: Tensor | None) -> None:
        self._frames[layer] = frames


def _last_frames(past: Tensor | None, x: Tensor, n: int) -> Tensor:
    """The last `n` frames of the stream `past ++ x` (fewer if the stream is shorter)."""
    if x.shape[2] >= n:
        # A clone frees the rest of x; when x is no longer than n, keeping x itself is free.
        return x[:, :, -n:].clone() if x.shape[2] > n else x
    if past is None:
        return x
    return torch.cat([past[:, :, -(n - x.shape[2]):], x], dim=2)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: frame t sees input frames t-k+1 .. t.

    Past frames come from the cache (zeros before the first frame). Spatial padding is the
    convolution's own (no copy).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        kernel_size = _triple(kernel_size)
        pad_t, pad_h, pad_w = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.time_pad = 2 * pad_t
        """Frames of history the kernel needs (the original pads 2*p in front, 0 behind)."""

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        # x: (B, C, T, H, W) -> (B, C_out, T', H', W')
        if self.time_pad == 0:
            return super().forward(x)
        past = cache.get(self) if cache is not None else None
        n_past = 0 if past is None else past.shape[2]
        # 1. the stream this chunk's outputs see: zeros, remembered frames, the chunk (one copy)
        if past is None:
            x_in = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        elif n_past < self.time_pad:
            zeros = torch.zeros_like(past[:, :, :1]).expand(-1, -1, self.time_pad - n_past, -1, -1)
            x_in = torch.cat([zeros, past, x], dim=2)
        else:
            x_in = torch.cat([past[:, :, -self.time_pad:], x], dim=2)
        # 2. remember the last frames for the next chunk
        if cache is not None:
            cache.put(self, _last_frames(past, x, self.time_pad))
        return super().forward(x_in)


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (+ bias), then SiLU if `silu`; `gamma` shaped
    (C, 1, 1[, 1]) as diffusers (the activation is part of the module so that a fused kernel,
    `engine.kernels.apply.fuse_vae_norms`, can do both in one pass; it has no parameters)."""

    def __init__(self, dim: int, images: bool = True, bias: bool = False, silu: bool = False) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.silu = silu
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, ...) ; the norm is over C, reduced in float32 without a float32 copy of x
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inv = (self.scale / norm.clamp_min(1e-12)).to(x.dtype)  # as F.normalize's eps
        out = x * inv
        out.mul_(self.gamma)
        if self.bias is not None:
            out.add_(self.bias)
        return F.silu(out, inplace=True) if self.silu else out


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> dropout -> causal conv, plus a shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, images=False, silu=True)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        h = self.conv_shortcut(x)
        x = self.conv1(self.norm1(x), cache)  # the norms include the SiLU
        x = self.conv2(self.dropout(self.norm2(x)), cache)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        identity = x
        # 1. frames as a batch of images
        x = _frames_to_images(x)  # (B*T, C, H, W)
        # 2. q, k, v: (B*T, 1, H*W, C)
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        # 3. attention, back to images, output projection
        x = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        x = x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        x = self.proj(x)
        return _images_to_frames(x, b).add_(identity)  # (B, C, T, H, W)


class Upsample2d(nn.Module):
    """Nearest 2x in H, W, then a 3x3 conv to `out_dim` channels, frame by frame."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
            nn.Conv2d(dim, out_dim, 3, padding=1),
        )

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # (B, C, T, H, W) -> (B, C_out, T, 2H, 2W)
        return _images_to_frames(self.resample(_frames_to_images(x)), x.shape[0])


class Upsample3d(Upsample2d):
    """Upsample2d after a causal 2x in time: each frame becomes two (channels -> frames).

    The very first frame of a video is not doubled (1 latent frame -> 1 pixel frame; the time
    conv starts at the second frame with zero history).
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(dim, out_dim)
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if cache.seen(self):
            # 1. (B, C, T, H, W) -> conv (B, 2C, T, H, W) -> (B, C, 2T, H, W)
            x = _interleave_time(self.time_conv(x, cache))
        else:
            cache.put(self, None)  # first chunk: the first frame passes through
        # 2. spatial 2x
        return super().forward(x, cache)


class Downsample2d(nn.Module):
    """Pad right/bottom by one, 3x3 conv with stride 2, frame by frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # (B, C, T, H, W) -> (B, C, T, H/2, W/2)
        return _images_to_frames(self.resample(_frames_to_images(x)), x.shape[0])


class Downsample3d(Downsample2d):
    """Downsample2d, then a stride-2 conv over time: frame 0 alone, then pairs (1,2), (3,4), ..."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # 1. spatial 2x down
        x = super().forward(x, cache)  # (B, C, T, H/2, W/2)
        # 2. time 2x down: the first frame passes through, then windows (2k-1, 2k, 2k+1)
        first_chunk, past = not cache.seen(self), cache.get(self)
        cache.put(self, _last_frames(None, x, 1))
        if first_chunk:
            return x
        return self.time_conv(torch.cat([past, x], dim=2))  # (B, C, T/2, H/2, W/2)


class AvgDown3d(nn.Module):
    """Wan2.2 encoder shortcut, parameter-free: space-time blocks folded into channels, averaged.

    Each input pixel's (factor_t x factor_s x factor_s) neighbourhood is stacked into channels in
    the order (c, dt, dh, dw); each output channel is the mean of `group` consecutive ones
    (group = in_dim * factor / out_dim). A chunk whose frame count is not a multiple of factor_t
    (the first chunk: 1 frame) gets zero frames in front, as diffusers and the official code.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if (in_dim * factor) % out_dim:
            raise ValueError(f"AvgDown3d: in_dim * factor_t * factor_s**2 = {in_dim} * {factor} must be "
                             f"a multiple of out_dim = {out_dim} (check base_dim and dim_mult)")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor // out_dim

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, T, H, W) -> (B, C_out, ceil(T / ft), H / fs, W / fs)
        ft, fs = self.factor_t, self.factor_s
        # 1. zero frames in front up to a multiple of factor_t
        if x.shape[2] % ft:
            x = F.pad(x, (0, 0, 0, 0, ft - x.shape[2] % ft, 0))
        b, c, t, h, w = x.shape
        # 2. (B, C, T', ft, H', fs, W', fs) -> (B, C, ft, fs, fs, T', H', W') -> (B, C_out, group, ...)
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        # 3. the mean of each group
        return x.mean(dim=2)


class DupUp3d(nn.Module):
    """Wan2.2 decoder shortcut, parameter-free: channels duplicated, then unfolded into space-time.

    The reverse of `AvgDown3d`: each input channel is repeated `repeats` times (repeats =
    out_dim * factor / in_dim); the result's channels (c, dt, dh, dw) become a (factor_t x factor_s
    x factor_s) block of output pixels. On the first chunk of a decode (the first latent frame) the
    first factor_t - 1 output frames are dropped, as the causal upsampler emits one frame there.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if (out_dim * factor) % in_dim:
            raise ValueError(f"DupUp3d: out_dim * factor_t * factor_s**2 = {out_dim} * {factor} must be "
                             f"a multiple of in_dim = {in_dim} (check decoder_base_dim and dim_mult)")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # x: (B, C, T, H, W) -> (B, C_out, ft T (- ft + 1 on the first chunk), fs H, fs W)
        ft, fs = self.factor_t, self.factor_s
        first_chunk = not cache.seen(self)
        cache.put(self, None)
        b, _, t, h, w = x.shape
        # 1. (B, C * repeats, T, H, W) = (B, C_out, ft, fs, fs, T, H, W)
        x = x.repeat_interleave(self.repeats, dim=1).reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        # 2. -> (B, C_out, T, ft, H, fs, W, fs) -> (B, C_out, ft T, fs H, fs W)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        # 3. the first chunk keeps its last frame only
        return x[:, :, ft - 1:] if first_chunk else x


class MidBlock(nn.Module):
    """Residual, attention, residual."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class UpBlock(nn.Module):
    """`num_res_blocks + 1` residual blocks, then an optional (2-D or 3-D) upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float,
                 upsampler: Callable[[int, int], nn.Module] | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(i, o, dropout) for i, o in zip(dims[:-1], dims[1:]))
        # the upsampler halves the channels (the next block's input width)
        self.upsamplers = nn.ModuleList([upsampler(out_dim, out_dim // 2)]) if upsampler else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class ResidualDownBlock(nn.Module):
    """Wan2.2 encoder level: `num_res_blocks` residual blocks, then an optional (2-D or 3-D)
    downsampler, plus an `AvgDown3d` shortcut from the level's input to its output."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float,
                 temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3d(in_dim, out_dim, factor_t=2 if temporal else 1,
                                      factor_s=2 if down else 1)
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList(ResidualBlock(i, o, dropout) for i, o in zip(dims[:-1], dims[1:]))
        self.downsampler = (Downsample3d if temporal else Downsample2d)(out_dim) if down else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T', H', W')
        shortcut = self.avg_shortcut(x)  # first: x can go as soon as the first block has run
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        # out of place: a 3-D downsampler keeps its first chunk's output as its cache
        return torch.add(x, shortcut, out=torch.empty_like(x))


class ResidualUpBlock(nn.Module):
    """Wan2.2 decoder level: `num_res_blocks + 1` residual blocks, then an optional upsampler that
    keeps the channel count, plus a `DupUp3d` shortcut from the level's input (upsampling levels
    only)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float,
                 temporal: bool, up: bool) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(i, o, dropout) for i, o in zip(dims[:-1], dims[1:]))
        self.upsampler = (Upsample3d if temporal else Upsample2d)(out_dim, out_dim) if up else None
        self.avg_shortcut = (DupUp3d(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2)
                             if up else None)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T', 2H, 2W) (T' = T, 2T, or 1 on a first chunk)
        h = x
        for resnet in self.resnets:
            h = resnet(h, cache)
        if self.upsampler is None:
            return h
        h = self.upsampler(h, cache)  # a fresh tensor (the caches hold the upsampler's inputs)
        return h.add_(self.avg_shortcut(x, cache))


class Encoder3d(nn.Module):
    """Video chunk (B, C_in, T, H, W) -> (B, 2*z, T', H/8, W/8) (mean and log-variance); C_in is
    3, or 12 patchified pixels (Wan2.2, whose H, W are then half the video's)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        c = config
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        last = len(c.dim_mult) - 1
        self.conv_in = CausalConv3d(c.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if c.is_residual:
                # Wan2.2: one block per level (residual blocks, downsampler, shortcut)
                temporal = level != last and c.temperal_downsample[level]
                blocks.append(ResidualDownBlock(in_dim, out_dim, c.num_res_blocks, c.dropout,
                                                temporal=temporal, down=level != last))
                continue
            # Wan2.1: a flat list, as diffusers: per level residual blocks, then a downsampler
            for _ in range(c.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, c.dropout))
                in_dim = out_dim
            if level != last:
                downsampler = Downsample3d if c.temperal_downsample[level] else Downsample2d
                blocks.append(downsampler(out_dim))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], c.dropout)
        self.norm_out = RMSNorm(dims[-1], images=False, silu=True)
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # 1. stem
        x = self.conv_in(x, cache)  # (B, C0, T, H, W)
        # 2. residual blocks and down-sampling (time: 1 -> 1 frame, then 4 -> 1)
        for block in self.down_blocks:
            x = block(x, cache)
        # 3. middle
        x = self.mid_block(x, cache)  # (B, C, T', H/8, W/8)
        # 4. head (the norm includes the SiLU)
        return self.conv_out(self.norm_out(x), cache)  # (B, 2z, T', H/8, W/8)


class Decoder3d(nn.Module):
    """Latent chunk (B, z, T, h, w) -> pixels (B, C_out, T', 8h, 8w); C_out is 3, or 12
    patchified pixels (Wan2.2: the video is then 16h x 16w)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        c = config
        dims = [c.decoder_dim * m for m in (c.dim_mult[-1], *reversed(c.dim_mult))]
        temperal_upsample = tuple(reversed(c.temperal_downsample))
        last = len(c.dim_mult) - 1
        self.conv_in = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], c.dropout)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if c.is_residual:
                # Wan2.2: upsamplers keep the channels; a shortcut around each upsampling level
                temporal = level != last and temperal_upsample[level]
                blocks.append(ResidualUpBlock(in_dim, out_dim, c.num_res_blocks, c.dropout,
                                              temporal=temporal, up=level != last))
                continue
            if level > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            upsampler = None
            if level != last:
                upsampler = Upsample3d if temperal_upsample[level] else Upsample2d
            blocks.append(UpBlock(in_dim, out_dim, c.num_res_blocks, c.dropout, upsampler))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False, silu=True)
        self.conv_out = CausalConv3d(dims[-1], c.out_channels, 3, padding=1)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # 1. stem and middle
        x = self.conv_in(x, cache)  # (B, C, T, h, w)
        x = self.mid_block(x, cache)
        # 2. up-sampling (time: first frame 1 -> 1, later frames 1 -> 4)
        for block in self.up_blocks:
            x = block(x, cache)  # ... -> (B, C0, T', 8h, 8w)
        # 3. head (the norm includes the SiLU)
        return self.conv_out(self.norm_out(x), cache)  # (B, C_out, T', 8h, 8w)


# ---------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan VAE (2.1 or 2.2, by config). `encode`: video in [-1, 1] -> normalised latents;
    `decode`: the reverse."""

    fusions: ClassVar[str] = "engine.models.wan.fusions:VAE_FUSIONS"
    """engine.dit seam: the fused RMSNorm + SiLU and channels-last that engine.kernels.optimize_vae applies."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        config.check_supported()
        self.config = config
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.memory_format = torch.contiguous_format
        """Layout of activations; `to_channels_last()` switches to channels_last_3d."""
        self.tiling: tuple[tuple[int, int], tuple[int, int]] | None = None
        """(tile, overlap) in latent pixels: `decode` runs `tiled_decode` with them (bounded
        memory; the loader sets DEFAULT_TILING for `EngineOptions.vae_tiling`); None: whole frames."""

    @classmethod
    def from_state_dict(cls, config: WanVAEConfig, state_dict: dict[str, Tensor],
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> "WanVAE":
        """Build on the meta device and assign the (diffusers-keyed) tensors: no double init
        (`engine.loading.build_module`: one tensor cast and moved at a time; `dtype` None keeps
        the tensors' own). The caller's dict is left as it was."""
        from engine.loading import build_module

        if dtype is None:
            dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
        return build_module(lambda: cls(config), dict(state_dict), dtype=dtype, device=device)

    # -- properties ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def _latent_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """mean, std as float32 (1, z, 1, 1, 1) (made per call: nothing to load or to keep)."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    # -- encode -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, F, H, W) in [-1, 1], F = 4k + 1 -> normalised posterior-mode latents,
        float32 (B, z, (F - 1) // 4 + 1, H/s, W/s), s = `config.spatial_scale` (8; Wan2.2: 16,
        and H, W must be multiples of 16)."""
        b, c, f, h, w = video.shape
        t_scale, s, p = self.config.temporal_scale, self.config.spatial_scale, self.config.patch
        if (f - 1) % t_scale:
            raise ValueError(f"video frames must be {t_scale}k + 1, got {f}")
        if c != VIDEO_CHANNELS:
            raise ValueError(f"video must have {VIDEO_CHANNELS} channels, got {c}")
        if self.config.is_residual and (h % s or w % s):
            raise ValueError(f"video height and width must be multiples of {s} for this VAE, got {h}x{w}")
        if h % p or w % p:
            raise ValueError(f"video height and width must be multiples of patch_size={p}, got {h}x{w}")
        # 0. model dtype and layout; Wan2.2: 2x2 pixel patches -> 12 channels (B, 12, F, H/2, W/2)
        x = video.to(device=self.device, dtype=self.dtype)
        x = _patchify(x, p, self.memory_format) if p > 1 else x.contiguous(memory_format=self.memory_format)
        # 1. frame 0 alone, then chunks of 4 frames, through one per-call cache
        cache = CausalCache()
        chunks = [x[:, :, :1]] + [x[:, :, i:i + t_scale] for i in range(1, f, t_scale)]
        moments = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        # 2. posterior mode: the mean half of the moments
        mu = self.quant_conv(moments)[:, : self.config.z_dim].float()  # (B, z, F', h, w)
        # 3. normalise
        mean, std = self._latent_stats(mu.device)
        return (mu - mean) / std

    # -- decode -------------------------------------------------------------------------------

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, z, F, h, w) -> video (B, 3, 4(F - 1) + 1, s h, s w) in [-1, 1]
        (s = `config.spatial_scale`: 8; Wan2.2: 16): whole frames, or in overlapping tiles when
        `self.tiling` is set."""
        if self.tiling is None:
            return self.decode_whole(latents)
        return tiled_decode(self, latents, *self.tiling)

    @torch.no_grad()
    def decode_whole(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """`decode` of whole frames, in the model dtype, clamped to [-1, 1] (`clamp=False` leaves
        it raw, for tiles that are blended)."""
        b, z, f, h, w = latents.shape
        if z != self.config.z_dim:
            raise ValueError(f"latents must have z_dim={self.config.z_dim} channels, got {z}")
        t_scale, s, p = self.config.temporal_scale, self.config.spatial_scale, self.config.patch
        # 1. de-normalise (float32), then model dtype and layout
        mean, std = self._latent_stats(self.device)
        x = latents.to(device=self.device, dtype=torch.float32) * std + mean
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        x = self.post_quant_conv(x)  # (B, z, F, h, w)
        # 2. one latent frame at a time through one per-call cache, into a preallocated output
        #    (Wan2.2: each chunk's 12 channels written straight into their 2x2 pixel patches)
        out = torch.empty((b, VIDEO_CHANNELS, t_scale * (f - 1) + 1, h * s, w * s),
                          dtype=self.dtype, device=self.device)
        frames_out = _pixel_patches(out, p)  # (B, 3, p, p, F', s h / p, s w / p): a view of out
        cache = CausalCache()
        for i in range(f):
            t0 = 0 if i == 0 else t_scale * (i - 1) + 1
            frames = self.decoder(x[:, :, i:i + 1], cache)  # (B, 3 p p, 1 or 4, s h / p, s w / p)
            frames_out[:, :, :, :, t0:t0 + frames.shape[2]] = frames.unflatten(1, (VIDEO_CHANNELS, p, p))
        # 3. clamp to the pixel range
        return out.clamp_(-1.0, 1.0) if clamp else out

    # -- speed --------------------------------------------------------------------------------

    def to_channels_last(self) -> "WanVAE":
        """Convolution weights and activations in channels-last(-3d) layout (cuDNN's fast path
        for bf16 3-D convs; the per-frame 2-D convs then need no transposing copies). Meant for
        CUDA: on CPU the results are equal but slower (about 2x in a small CPU run)."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last_3d
        return self


# ---------------------------------------------------------------------------------------------
# Tiled decode: bounded memory, and tiles that can be spread over ranks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileRegion:
    """One spatial tile of the latent: rows [h0, h1), columns [w0, w1) (latent pixels).

    `ramp_h`/`ramp_w` are the overlaps (latent pixels) with the previous and the next tile along
    that axis (0 at the image border); the tile's blend weight ramps linearly across them.
    """

    h0: int
    h1: int
    w0: int
    w1: int
    ramp_h: tuple[int, int] = (0, 0)
    ramp_w: tuple[int, int] = (0, 0)


def _plan_axis(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Equal spans of at most `tile` covering [0, length), neighbours overlapping >= `overlap`."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)  # <= tile
    starts = [k * (length - size) // (n - 1) for k in range(n)]
    return [(s, s + size) for s in starts]


def plan_tiles(latent_hw: tuple[int, int], tile_latent: tuple[int, int] = (32, 32),
               overlap_latent: tuple[int, int] = (8, 8)) -> list[TileRegion]:
    """Cover a (h, w) latent with overlapping tiles, row-major, all of ONE shape (<= tile_latent),
    neighbours overlapping by >= overlap_latent. Pure and deterministic, so every rank computes
    the same plan. Defaults: 256-px tiles with 64-px overlaps (diffusers' tiling geometry)."""
    for name, (tile, overlap) in {"h": (tile_latent[0], overlap_latent[0]),
                                  "w": (tile_latent[1], overlap_latent[1])}.items():
        if not 0 <= overlap < tile:
            raise ValueError(f"tile/overlap along {name} must satisfy 0 <= overlap < tile, got "
                             f"tile_latent={tile}, overlap_latent={overlap}")
    rows = _plan_axis(latent_hw[0], tile_latent[0], overlap_latent[0])
    cols = _plan_axis(latent_hw[1], tile_latent[1], overlap_latent[1])

    def ramps(spans: list[tuple[int, int]], k: int) -> tuple[int, int]:
        before = spans[k - 1][1] - spans[k][0] if k > 0 else 0
        after = spans[k][1] - spans[k + 1][0] if k + 1 < len(spans) else 0
        return before, after

    return [
        TileRegion(h0, h1, w0, w1, ramps(rows, i), ramps(cols, j))
        for i, (h0, h1) in enumerate(rows)
        for j, (w0, w1) in enumerate(cols)
    ]


def decode_tile(vae: WanVAE, latents: Tensor, region: TileRegion) -> Tensor:
    """Decode one spatial tile over all frames (a normal causal decode of the cropped latent).
    Returns raw, unclamped pixels (B, 3, F', s (h1 - h0), s (w1 - w0)) for `blend`
    (s = `vae.config.spatial_scale`)."""
    return vae.decode_whole(latents[..., region.h0:region.h1, region.w0:region.w1], clamp=False)


class TileBlender:
    """Accumulates decoded tiles with linear-ramp weights (float32), then normalises and clamps.

    Weights along an axis rise from ~0 to 1 across the overlap with the previous tile and fall
    across the overlap with the next one; neighbours' ramps sum to 1, and the final division by
    the summed weights makes any arrangement exact.
    """

    def __init__(self, latent_hw: tuple[int, int], spatial_scale: int = 8) -> None:
        self.scale = spatial_scale
        self.hw = (latent_hw[0] * spatial_scale, latent_hw[1] * spatial_scale)
        self._sum: Tensor | None = None  # (B, C, F, H, W) float32
        self._weight: Tensor | None = None  # (H, W) float32
        self._dtype = torch.float32

    def add(self, region: TileRegion, pixels: Tensor) -> None:
        s = self.scale
        if self._sum is None:
            b, c, f = pixels.shape[:3]
            self._sum = torch.zeros((b, c, f, *self.hw), dtype=torch.float32, device=pixels.device)
            self._weight = torch.zeros(self.hw, dtype=torch.float32, device=pixels.device)
            self._dtype = pixels.dtype
        wh = _ramp(pixels.shape[-2], region.ramp_h[0] * s, region.ramp_h[1] * s, pixels.device)
        ww = _ramp(pixels.shape[-1], region.ramp_w[0] * s, region.ramp_w[1] * s, pixels.device)
        weight = wh[:, None] * ww[None, :]  # (h, w)
        rows, cols = slice(region.h0 * s, region.h1 * s), slice(region.w0 * s, region.w1 * s)
        self._sum[..., rows, cols].add_(pixels.float() * weight)
        self._weight[rows, cols].add_(weight)

    def result(self) -> Tensor:
        """The blended video (B, C, F, H, W), clamped to [-1, 1], in the tiles' dtype."""
        if self._sum is None:
            raise ValueError("no tiles were added")
        if not bool((self._weight > 0).all()):
            raise ValueError("the tiles do not cover the whole latent")
        return (self._sum / self._weight).clamp_(-1.0, 1.0).to(self._dtype)


def _ramp(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """(n,) weights: (i + 0.5) / before over the first `before`, mirrored over the last `after`."""
    w = torch.ones(n, dtype=torch.float32, device=device)
    if before:
        w[:before] *= (torch.arange(before, dtype=torch.float32, device=device) + 0.5) / before
    if after:
        w[n - after:] *= (torch.arange(after, 0, -1, dtype=torch.float32, device=device) - 0.5) / after
    return w


def blend(pieces: Sequence[tuple[TileRegion, Tensor]], latent_hw: tuple[int, int],
          spatial_scale: int = 8) -> Tensor:
    """Blend decoded tiles [(region, decode_tile(...)), ...] into the video (B, 3, F', H, W)."""
    blender = TileBlender(latent_hw, spatial_scale)
    for region, pixels in pieces:
        blender.add(region, pixels)
    return blender.result()


DEFAULT_TILING = ((32, 32), (8, 8))
"""(tile, overlap) in latent pixels of `EngineOptions.vae_tiling` for the Wan2.1 VAE: 256x256-pixel
tiles, 64 shared (`default_tiling` gives the same pixel geometry for any spatial scale)."""


def default_tiling(config: WanVAEConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(tile, overlap) in latent pixels for 256x256-pixel tiles sharing 64 pixels: DEFAULT_TILING
    for Wan2.1 (scale 8), ((16, 16), (4, 4)) for Wan2.2 (scale 16)."""
    s = config.spatial_scale
    return (256 // s, 256 // s), (64 // s, 64 // s)


def tiled_decode(vae: WanVAE, latents: Tensor, tile_latent: tuple[int, int] = DEFAULT_TILING[0],
                 overlap_latent: tuple[int, int] = DEFAULT_TILING[1]) -> Tensor:
    """`vae.decode_whole` in overlapping spatial tiles: peak activation memory is that of one tile.

    Equals the plain decode up to the tiles' border effects, which the linear blend hides (the
    test measures it). To spread the work over ranks (e.g. a DiT group decoding one video):
        regions = plan_tiles(latents.shape[-2:], tile, overlap)        # same on every rank
        mine = [(i, decode_tile(vae, latents, regions[i])) for i in range(rank, len(regions), world)]
        # gather `mine` on rank 0 (e.g. torch.distributed.gather_object, or pad + gather), then
        video = blend([(regions[i], pixels) for i, pixels in gathered], latents.shape[-2:],
                      vae.config.spatial_scale)                        # rank 0 only
    `blend` accepts the tiles in any order; for bounded memory on rank 0, feed a `TileBlender`
    tile by tile instead of holding all of them.
    """
    latent_hw = (latents.shape[-2], latents.shape[-1])
    blender = TileBlender(latent_hw, vae.config.spatial_scale)
    for region in plan_tiles(latent_hw, tile_latent, overlap_latent):
        blender.add(region, decode_tile(vae, latents, region))
    return blender.result()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels-last(-3d) when x is (and is not also plain contiguous), else contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def _interleave_time(x: Tensor) -> Tensor:
    """(B, 2C, T, H, W) -> (B, C, 2T, H, W): channel half j becomes frame 2t + j (one copy,
    keeping x's layout)."""
    b, c2, t, h, w = x.shape
    c = c2 // 2
    out = torch.empty((b, c, 2 * t, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    out.view(b, c, t, 2, h, w).copy_(x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5))
    return out


def _patchify(x: Tensor, p: int, memory_format: torch.memory_format) -> Tensor:
    """(B, C, F, H, W) -> (B, C p p, F, H/p, W/p) in `memory_format` (one copy). Channel order
    (c, r, q), r the column and q the row inside the patch: the official
    `b c f (h q) (w r) -> b (c r q) f h w` (= diffusers' `patchify`)."""
    b, c, f, h, w = x.shape
    out = torch.empty((b, c * p * p, f, h // p, w // p), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    out.unflatten(1, (c, p, p)).copy_(_pixel_patches(x, p))
    return out


def _pixel_patches(x: Tensor, p: int) -> Tensor:
    """A view of pixels (B, C, F, h p, w p) as (B, C, r, q, F, h, w): pixel (row h p + q, column
    w p + r). Against (B, C p p, F, h, w).unflatten(1, (C, p, p)), a copy either way (un)patchifies."""
    b, c, f, hp, wp = x.shape
    x = x.unflatten(4, (wp // p, p)).unflatten(3, (hp // p, p))  # (B, C, F, h, q, w, r)
    return x.permute(0, 1, 6, 4, 2, 3, 5)


def _frames_to_images(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W); a view when x is channels-last-3d."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _images_to_frames(x: Tensor, batch: int) -> Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W) (a view)."""
    bt, c, h, w = x.shape
    return x.view(batch, bt // batch, c, h, w).transpose(1, 2)

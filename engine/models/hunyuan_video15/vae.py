"""HunyuanVideo-1.5 VAE: causal 3-D convolutions, 32 latent channels, 16x spatial / 4x temporal.

A re-implementation of diffusers 0.42.1 `AutoencoderKLHunyuanVideo15` with the same parameter
names (the official release's `vae/` goes through `keymap_vae.official_to_diffusers`).

    pixels (B, 3, 4k+1, H, W) in [-1, 1]  <->  latents (B, 32, k+1, H/16, W/16)

`encode` returns the posterior mean times `scaling_factor` (1.03682, no shift); `decode` takes
those normalised latents back to pixels (not clamped). The whole video passes at once (no causal
chunking: diffusers' model has none); the first frame is handled alone by every temporal
resampler ("first frame alone": 1 + 4k frames). Resampling is space/time-to-channel packing with
averaging (down) or repeating (up) shortcuts; norms are channel RMS norms; the mid-block
attention is frame-causal (a frame attends to itself and the frames before it), computed here
one query frame at a time instead of with diffusers' (L x L) mask: the same result without an
L x L tensor.

`tiling` (set by the loader for `EngineOptions.vae_tiling`): decode in spatial tiles of 256 px
with 64-px linear blends, diffusers' `enable_tiling()` geometry (`tiled_decode`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VIDEO_CHANNELS = 3


@dataclass(frozen=True)
class HunyuanVideo15VAEConfig:
    """Field names equal diffusers' `vae/config.json` keys."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    layers_per_block: int = 2
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True
    scaling_factor: float = 1.03682

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        levels = len(self.block_out_channels)
        for name, ratio in (("spatial_compression_ratio", self.spatial_compression_ratio),
                            ("temporal_compression_ratio", self.temporal_compression_ratio)):
            if ratio < 1 or ratio & (ratio - 1) or int(math.log2(ratio)) >= levels:
                raise ValueError(f"{name} must be a power of two below 2**{levels} (one resampler per "
                                 f"level but the last), got {ratio}")
        if self.temporal_compression_ratio > self.spatial_compression_ratio:
            raise ValueError("temporal_compression_ratio cannot exceed spatial_compression_ratio")
        first, last = self.block_out_channels[0], self.block_out_channels[-1]
        if last % (2 * self.latent_channels) or first % self.latent_channels:
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of the latent "
                             f"channels ({self.latent_channels}; the last of twice that)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HunyuanVideo15VAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and not k.startswith("_")})

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> "HunyuanVideo15VAEConfig":
        """From the official release's `vae/config.json` (`ffactor_spatial`, `ffactor_temporal`, ...)."""
        if d.get("shift_factor"):
            raise ValueError(f"vae config: shift_factor={d['shift_factor']!r} is not supported (the "
                             "HunyuanVideo-1.5 VAE scales its latents only)")
        return cls(
            in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
            latent_channels=int(d["latent_channels"]), block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=int(d["layers_per_block"]), spatial_compression_ratio=int(d["ffactor_spatial"]),
            temporal_compression_ratio=int(d["ffactor_temporal"]),
            downsample_match_channel=bool(d.get("downsample_match_channel", True)),
            upsample_match_channel=bool(d.get("upsample_match_channel", True)),
            scaling_factor=float(d["scaling_factor"]),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


# ---------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Module):
    """Conv3d after replicate padding: (k - 1) past frames, k // 2 on each spatial side (key `conv`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        k = kernel_size
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class RMSNorm(nn.Module):
    """Channel RMS norm: x / ||x||_C * sqrt(C) * gamma (float32 normalisation for 16-bit inputs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        upcast = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if upcast else x, dim=1).to(x.dtype) * self.scale * self.gamma


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head attention over all positions, frame-causal (frame i sees frames 0..i)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels)
        self.to_q = nn.Conv3d(channels, channels, 1)
        self.to_k = nn.Conv3d(channels, channels, 1)
        self.to_v = nn.Conv3d(channels, channels, 1)
        self.proj_out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, f, h, w = x.shape
        hn = self.norm(x)
        # (B, 1, F * H * W, C) tokens in (f, h, w) order
        q, k, v = (conv(hn).flatten(2).transpose(1, 2)[:, None] for conv in (self.to_q, self.to_k, self.to_v))
        n = h * w
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i * n:(i + 1) * n], k[:, :, :(i + 1) * n],
                                                        v[:, :, :(i + 1) * n]) for i in range(f)], dim=2)
        out = out[:, 0].transpose(1, 2).reshape(b, c, f, h, w)
        return x + self.proj_out(out)


def _pack(x: Tensor, rt: int) -> Tensor:
    """(B, C, rt F, 2 H, 2 W) -> (B, rt * 4 * C, F, H, W): time/space into channels."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f // rt, rt, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, rt * 4 * c, f // rt, h // 2, w // 2)


def _unpack(x: Tensor, rt: int) -> Tensor:
    """(B, rt * 4 * C, F, H, W) -> (B, C, rt F, 2 H, 2 W): the inverse of `_pack`."""
    b, packed, f, h, w = x.shape
    c = packed // (rt * 4)
    x = x.view(b, rt, 2, 2, c, f, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, c, f * rt, h * 2, w * 2)


class Downsample(nn.Module):
    """2x space (and 2x time after the first frame): conv then pack, plus an averaging shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        factor = 8 if temporal else 4
        self.temporal = temporal
        self.conv = CausalConv3d(in_channels, out_channels // factor)
        self.group_size = factor * in_channels // out_channels

    def _shortcut(self, x: Tensor, rt: int, group: int, out_channels: int) -> Tensor:
        packed = _pack(x, rt)
        b, _, f, h, w = packed.shape
        return packed.view(b, out_channels, group, f, h, w).mean(dim=2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if not self.temporal:
            out = _pack(h, 1)
            return out + self._shortcut(x, 1, self.group_size, out.shape[1])
        # the first frame alone (its packed channels duplicated), the rest 2x in time
        first = _pack(h[:, :, :1], 1)
        out = torch.cat([torch.cat([first, first], dim=1), _pack(h[:, :, 1:], 2)], dim=2)
        channels = out.shape[1]
        shortcut = torch.cat([self._shortcut(x[:, :, :1], 1, self.group_size // 2, channels),
                              self._shortcut(x[:, :, 1:], 2, self.group_size, channels)], dim=2)
        return out + shortcut


class Upsample(nn.Module):
    """2x space (and 2x time after the first frame): conv then unpack, plus a repeating shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        factor = 8 if temporal else 4
        self.temporal = temporal
        self.conv = CausalConv3d(in_channels, out_channels * factor)
        self.repeats = factor * out_channels // in_channels

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if not self.temporal:
            return _unpack(h, 1) + _unpack(x.repeat_interleave(self.repeats, dim=1), 1)
        first = _unpack(h[:, :, :1], 1)
        out = torch.cat([first[:, :first.shape[1] // 2], _unpack(h[:, :, 1:], 2)], dim=2)
        shortcut = torch.cat([_unpack(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1),
                              _unpack(x[:, :, 1:], 2).repeat_interleave(self.repeats, dim=1)], dim=2)
        return out + shortcut


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])
        self.attentions = nn.ModuleList([AttentionBlock(channels)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, down: tuple[int, bool] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels, *down)]) if down is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, up: tuple[int, bool] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels, *up)]) if up is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig) -> None:
        super().__init__()
        ch = cfg.block_out_channels
        spatial_levels = int(math.log2(cfg.spatial_compression_ratio))
        first_temporal = int(math.log2(cfg.spatial_compression_ratio // cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList()
        width = ch[0]
        for i, out in enumerate(ch):
            down = None
            if i < spatial_levels:
                target = ch[i + 1] if cfg.downsample_match_channel else out
                down = (target, i >= first_temporal)
            self.down_blocks.append(DownBlock(width, out, cfg.layers_per_block, down))
            width = down[0] if down is not None else out
        self.mid_block = MidBlock(ch[-1])
        self.norm_out = RMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)
        self.group_size = ch[-1] // (2 * cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        b, _, f, hh, ww = h.shape
        shortcut = h.view(b, -1, self.group_size, f, hh, ww).mean(dim=2)    # (B, 2 z, F, H, W)
        return self.conv_out(F.silu(self.norm_out(h))) + shortcut


class Decoder(nn.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig) -> None:
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        spatial_levels = int(math.log2(cfg.spatial_compression_ratio))
        temporal_levels = int(math.log2(cfg.temporal_compression_ratio))
        self.repeat = ch[0] // cfg.latent_channels
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid_block = MidBlock(ch[0])
        self.up_blocks = nn.ModuleList()
        width = ch[0]
        for i, out in enumerate(ch):
            up = None
            if i < spatial_levels or i < temporal_levels:
                target = ch[i + 1] if cfg.upsample_match_channel else out
                up = (target, i < temporal_levels)
            self.up_blocks.append(UpBlock(width, out, cfg.layers_per_block + 1, up))
            width = up[0] if up is not None else out
        self.norm_out = RMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z) + z.repeat_interleave(self.repeat, dim=1)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# The codec


@dataclass(frozen=True)
class Tiling:
    """Spatial tiling of the decode, in pixels (diffusers' `enable_tiling()` defaults)."""

    tile: int = 256
    overlap_factor: float = 0.25


class HunyuanVideo15VAE(nn.Module):
    """`engine.families.LatentCodec` of HunyuanVideo-1.5 (see the module docstring)."""

    def __init__(self, config: HunyuanVideo15VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.tiling: Tiling | None = None
        """Decode in spatial tiles (the loader sets it for `EngineOptions.vae_tiling`); None: whole."""

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.conv.weight.device

    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, 32, (F - 1) / 4 + 1, H / 16, W / 16):
        the posterior mean (diffusers' `latent_dist.mode()`) times scaling_factor."""
        moments = self.encoder(video.to(self.dtype))                            # (B, 2 z, F', H', W')
        mean = moments[:, :self.config.latent_channels]
        return mean * self.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> (B, 3, F, H, W), about [-1, 1] (not clamped)."""
        z = latents.to(self.dtype) / self.config.scaling_factor
        if self.tiling is None:
            return self.decoder(z)
        return self.tiled_decode(z)

    def tiled_decode(self, z: Tensor) -> Tensor:
        """Decode un-normalised latents in overlapping spatial tiles blended linearly (diffusers'
        `tiled_decode`: tiles of `tile` px every (1 - overlap) * tile, blends of overlap * tile px);
        a latent no larger than one tile is decoded whole."""
        s = self.config.spatial_compression_ratio
        tile_px, factor = self.tiling.tile, self.tiling.overlap_factor
        tile = tile_px // s                                                     # latent tile
        _, _, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decoder(z)
        step = int(tile * (1 - factor))                                         # latent stride
        blend = int(tile_px * factor)                                           # pixels blended
        keep = tile_px - blend                                                  # pixels kept per tile
        rows = [[self.decoder(z[:, :, :, i:i + tile, j:j + tile]) for j in range(0, w, step)]
                for i in range(0, h, step)]
        out_rows = []
        for i, row in enumerate(rows):
            kept = []
            for j, piece in enumerate(row):
                if i > 0:
                    piece = _blend(rows[i - 1][j], piece, blend, dim=3)
                if j > 0:
                    piece = _blend(row[j - 1], piece, blend, dim=4)
                kept.append(piece[:, :, :, :keep, :keep])
            out_rows.append(torch.cat(kept, dim=4))
        return torch.cat(out_rows, dim=3)


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """b with its first `extent` rows (dim 3) or columns (dim 4) ramped from a's last ones (in place,
    as diffusers' blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        src = a.narrow(dim, a.shape[dim] - extent + y, 1)
        dst = b.narrow(dim, y, 1)
        dst.copy_(src * (1 - y / extent) + dst * (y / extent))
    return b

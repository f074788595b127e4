"""Split VAE decode: the ranks of a group decode different spatial tiles; one rank blends them.

Built on the VAE's tiling helpers (`engine.models.wan.vae`: `plan_tiles`, `decode_tile`, `blend`):

1. every rank computes the same tile plan (pure function of the latent size);
2. rank r decodes tiles r, r + d, r + 2d, ... (each a normal causal decode of the cropped latent,
   over all frames, so no state crosses ranks);
3. the tiles, all of one shape, are stacked, padded to the same count on every rank and gathered
   on the destination rank, which blends them with the linear overlap ramps.

The result equals the single-rank `tiled_decode` with the same geometry (same tiles, same blend)
and is close to the plain decode up to the tiles' border effects (the VAE engineer measured and
bounds those; the overlap hides them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from engine.models.wan.vae import VIDEO_CHANNELS, WanVAE, blend, decode_tile, plan_tiles
from engine.parallel.mesh import SubGroup


def split_decode(vae: WanVAE, latents: Tensor, group: SubGroup, tile_latent: tuple[int, int] = (32, 32),
                 overlap_latent: tuple[int, int] = (8, 8), dst: int = 0) -> Tensor | None:
    """Decode normalised latents (B, z, F, h, w) over the ranks of `group`.

    Returns the video (B, 3, F', s h, s w) (s = `vae.config.spatial_scale`: 8, Wan2.2 16), clamped
    to [-1, 1], on group rank `dst`; None on the other ranks. A group of one is the single-rank
    tiled decode.
    """
    latent_hw = (latents.shape[-2], latents.shape[-1])
    regions = plan_tiles(latent_hw, tile_latent, overlap_latent)
    scale = vae.config.spatial_scale

    # 1. This rank's tiles (round robin), decoded.
    mine = list(range(group.rank, len(regions), group.size))
    pieces = [decode_tile(vae, latents, regions[i]) for i in mine]     # each (B, 3, F', s th, s tw)
    if group.size == 1:
        return blend(list(zip((regions[i] for i in mine), pieces)), latent_hw, scale)

    # 2. Same tile count on every rank (zeros for the missing ones), gathered on dst.
    per_rank = -(-len(regions) // group.size)
    stacked = torch.zeros((per_rank, *_tile_shape(vae, latents, regions[0])), dtype=vae.dtype,
                          device=vae.device)
    for k, pixels in enumerate(pieces):
        stacked[k] = pixels
    is_dst = group.rank == dst
    gathered = [torch.empty_like(stacked) for _ in range(group.size)] if is_dst else None
    dist.gather(stacked, gathered, dst=dist.get_global_rank(group.group, dst), group=group.group)
    if not is_dst:
        return None

    # 3. Blend on dst, tiles in plan order.
    ordered = [(regions[i], gathered[i % group.size][i // group.size]) for i in range(len(regions))]
    return blend(ordered, latent_hw, scale)


def _tile_shape(vae: WanVAE, latents: Tensor, region) -> tuple[int, ...]:
    """Shape of one decoded tile (every tile of a plan has the same size)."""
    b, _, f = latents.shape[:3]
    frames = (f - 1) * vae.config.temporal_scale + 1
    s = vae.config.spatial_scale
    return (b, VIDEO_CHANNELS, frames, (region.h1 - region.h0) * s, (region.w1 - region.w0) * s)

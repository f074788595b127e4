"""Exact split VAE decode: row stripes per rank, halo rows exchanged before every spatial operator.

`split_decode` (engine.parallel.vae) hands whole tiles to ranks and blends their overlaps; each
tile sees less context than the full frame, so its result differs from the plain decode. Here the
ranks of a group instead decode ONE image together (the DistVAE / PatchVAE idea), and every
operator that looks at neighbouring rows gets exactly the rows the single-rank decode would give
it, so the result equals `WanVAE.decode` up to float rounding.

Split: the latent height h is cut into contiguous row stripes, one per rank, in rank order
(sizes differ by at most one: rank r gets h // n rows, plus one if r < h % n; every rank needs
at least one row). A stripe of r latent rows is 2r, 4r, 8r rows after each 2x upsampling (and
16r pixel rows after the Wan2.2 VAE's 2x2 unpatchify), so the stripe boundaries simply scale with
the resolution. Width and time are not split.

What is exchanged, per decoded latent frame (the VAE decodes one latent frame at a time; a
frame is 1 pixel frame for the first latent frame, then 4), in the decoder of `WanVAE`:

  * every causal 3-D conv with a 3x3 spatial kernel (conv_in, the two convs of each residual
    block, conv_out): ONE halo row from each neighbour (its last row from the rank above, its
    first row from the rank below), for each of the chunk's frames, before the conv. The conv
    then runs with no height padding; zero rows stand in at the true top and bottom border,
    exactly as the conv's own zero padding would. The time axis is untouched: the causal cache
    (per call, as in `WanVAE.decode`) stores the haloed input, so the past frames come with
    their halo rows too;
  * the 3x3 `Conv2d` of each upsampler (after the local nearest 2x upsampling, which commutes
    with the row split): one halo row from each neighbour at the doubled resolution;
  * the mid-block attention (global over the pixels of each frame): each rank computes q, k, v
    for its own rows, all-gathers k and v (padded to the largest stripe) and attends with its
    local queries over all keys;
  * at the end, the decoded pixel stripes (padded to the largest stripe) are gathered on `dst`.

Per-pixel operators (RMS norms, SiLU, 1x1 shortcuts, the temporal (3, 1, 1) convs of the 3-D
upsamplers, the time interleave) run on the local stripe with no communication; so do the Wan2.2
VAE's `DupUp3d` shortcuts (each row becomes two, like the nearest upsampling) and its final
unpatchify (each row becomes two pixel rows).

Communication per latent frame (4 pixel frames after the first): for each of the decoder's 33
row-spanning convs, one row of its input (C_k channels x W_k pixels x the chunk's frames T_k) to
each neighbour; the k/v all-gather moves 2 x C x h x w values in all (C the mid-block width,
h x w the latent frame; each rank receives the other ranks' share). For Wan2.1 at 480x832
(latent 60x104) that is sum(C_k W_k T_k) = 6.9 M values, 27 MB in float32 (14 MB in bf16), to
each neighbour, plus 19 MB (float32) of k/v gathered; the decoded frame itself is 19 MB.

Applied from outside: `halo_vae_view` deep-copies the VAE's module tree while SHARING every
parameter (no weight copy), and swaps, in the copy's decoder, the spatial convs for halo
wrappers and the attention block for a row-split one; the copy's own `decode` (same chunk loop,
same per-call cache) then decodes the local stripe. The original VAE is left untouched.
Each halo adds one copy of the conv input (the plain VAE pads inside the conv); channels-last
(`WanVAE.to_channels_last`) is kept.

    video = halo_split_decode(vae, latents, group)   # same latents on every rank of `group`
    # -> (B, 3, F', s h, s w) clamped to [-1, 1] on group rank 0, None on the others
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.wan.vae import AttentionBlock, CausalCache, CausalConv3d, WanVAE, memory_format_of
from engine.parallel.mesh import SubGroup

# ---------------------------------------------------------------------------------------------
# The row split and its communication
# ---------------------------------------------------------------------------------------------


def stripe_rows(height: int, size: int) -> tuple[int, ...]:
    """Latent rows per rank: contiguous stripes, sizes differing by at most one, larger first."""
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    if height < size:
        raise ValueError(
            f"latent height {height} is smaller than the group size {size}: the halo split decode "
            f"needs at least one latent row per rank (use a group of at most {height} ranks, or "
            "the tiled split_decode)")
    base, extra = divmod(height, size)
    return tuple(base + (1 if r < extra else 0) for r in range(size))


@dataclass(frozen=True)
class RowStripes:
    """This rank's view of the row split, with the exchanges the halo layers need.

    Works at any resolution of the decoder: a tensor whose height is `factor` times this rank's
    latent rows is split as `factor` times the latent split.
    """

    group: SubGroup
    rows: tuple[int, ...]
    """Latent rows of each rank of the group, in rank order."""

    @property
    def start(self) -> int:
        """First latent row of this rank."""
        return sum(self.rows[: self.group.rank])

    def _factor(self, x: Tensor) -> int:
        """Resolution of `x` relative to the latent (1, 2, 4, 8; 16 for Wan2.2 pixels), from its
        local height."""
        mine = self.rows[self.group.rank]
        factor, rest = divmod(x.shape[-2], mine)
        if rest:
            raise ValueError(f"local height {x.shape[-2]} is not a multiple of this rank's {mine} "
                             "latent rows: not a stripe of the row split")
        return factor

    def _peer(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group.group, group_rank)

    def pad_rows(self, x: Tensor, halo: int) -> Tensor:
        """(..., H_local, W) -> (..., halo + H_local + halo, W): the neighbours' rows above and
        below (zeros at the image border), as the unsplit tensor would have around this stripe."""
        if halo == 0:
            return x
        rank, size = self.group.rank, self.group.size
        factor = self._factor(x)
        if any(r * factor < halo for r in self.rows):
            raise ValueError(f"a halo of {halo} rows needs stripes of >= {halo} rows at every rank; "
                             f"stripes here are {[r * factor for r in self.rows]} rows")
        edge = (*x.shape[:-2], halo, x.shape[-1])
        # 1. this rank's first rows go up, its last rows go down; the neighbours' come back
        #    (plain contiguous buffers on the wire, whatever the layout of x)
        received: dict[int, Tensor] = {}  # neighbour's group rank -> its rows next to ours
        ops = []
        for peer, rows in ((rank - 1, x[..., :halo, :]), (rank + 1, x[..., -halo:, :])):
            if 0 <= peer < size:
                received[peer] = torch.empty(edge, dtype=x.dtype, device=x.device)
                group, peer_global = self.group.group, self._peer(peer)
                ops += [dist.P2POp(dist.isend, rows.contiguous(), peer_global, group),
                        dist.P2POp(dist.irecv, received[peer], peer_global, group)]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        # 2. above ++ x ++ below in x's layout (channels-last stays so); zeros at the true top /
        #    bottom border, as the conv's own zero padding
        out = torch.empty((*x.shape[:-2], x.shape[-2] + 2 * halo, x.shape[-1]), dtype=x.dtype,
                          device=x.device, memory_format=memory_format_of(x))
        out[..., halo:-halo, :] = x
        for rows, peer in ((out[..., :halo, :], rank - 1), (out[..., -halo:, :], rank + 1)):
            if peer in received:
                rows.copy_(received[peer])
            else:
                rows.zero_()
        return out

    def all_gather_rows(self, x: Tensor) -> Tensor:
        """(..., H_local, W) stripes of every rank -> the whole (..., H, W), on every rank."""
        if self.group.size == 1:
            return x
        factor = self._factor(x)
        heights = [r * factor for r in self.rows]
        padded = _pad_height(x, max(heights))
        gathered = [torch.empty_like(padded) for _ in heights]
        dist.all_gather(gathered, padded, group=self.group.group)
        return torch.cat([g[..., :h, :] for g, h in zip(gathered, heights)], dim=-2)

    def gather_rows(self, x: Tensor, dst: int) -> Tensor | None:
        """Stripes of every rank -> the whole tensor on group rank `dst`; None elsewhere."""
        if self.group.size == 1:
            return x
        factor = self._factor(x)
        heights = [r * factor for r in self.rows]
        padded = _pad_height(x, max(heights))
        is_dst = self.group.rank == dst
        gathered = [torch.empty_like(padded) for _ in heights] if is_dst else None
        dist.gather(padded, gathered, dst=self._peer(dst), group=self.group.group)
        if not is_dst:
            return None
        return torch.cat([g[..., :h, :] for g, h in zip(gathered, heights)], dim=-2)


def _pad_height(x: Tensor, height: int) -> Tensor:
    """Zero rows appended below to reach `height` (a contiguous tensor for the collectives)."""
    return F.pad(x, (0, 0, 0, height - x.shape[-2])).contiguous()


# ---------------------------------------------------------------------------------------------
# Halo layers (swapped into a parameter-sharing copy of the decoder)
# ---------------------------------------------------------------------------------------------


class HaloCausalConv3d(nn.Module):
    """A causal 3-D conv on a row stripe: neighbour rows replace the conv's height padding.

    Takes over `conv` (a parameter-sharing copy): its height padding is set to 0.
    """

    def __init__(self, conv: CausalConv3d, stripes: RowStripes) -> None:
        super().__init__()
        _check_same_rows(conv)
        self.halo = conv.padding[1]
        conv.padding = (0, 0, conv.padding[2])  # the copy's conv only: heights come haloed
        self.conv = conv
        self.stripes = stripes

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        # x: (B, C, T, H_local, W) -> (B, C_out, T, H_local, W); the cache keys on self.conv
        return self.conv(self.stripes.pad_rows(x, self.halo), cache)


class HaloConv2d(nn.Module):
    """The upsamplers' per-frame 3x3 conv on a row stripe (images (B*T, C, H_local, W)).

    Takes over `conv` (a parameter-sharing copy): its height padding is set to 0.
    """

    def __init__(self, conv: nn.Conv2d, stripes: RowStripes) -> None:
        super().__init__()
        _check_same_rows(conv)
        self.halo = conv.padding[0]
        conv.padding = (0, conv.padding[1])
        self.conv = conv
        self.stripes = stripes

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.stripes.pad_rows(x, self.halo))


class StripeAttentionBlock(nn.Module):
    """`AttentionBlock` on a row stripe: local queries attend over the keys/values of all rows."""

    def __init__(self, block: AttentionBlock, stripes: RowStripes) -> None:
        super().__init__()
        self.norm, self.to_qkv, self.proj = block.norm, block.to_qkv, block.proj
        self.stripes = stripes

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape  # h: this rank's rows
        identity = x
        # 1. frames as a batch of images
        x = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, h, W)
        # 2. q, k, v of the local rows; k, v of every rank's rows
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=1)  # (B*T, C, h, W) each
        kv = self.stripes.all_gather_rows(torch.cat([k, v], dim=1))  # (B*T, 2C, H, W)
        k, v = kv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(2, dim=-1)  # (B*T, 1, H*W, C)
        q = q.flatten(2).transpose(1, 2).unsqueeze(1)  # (B*T, 1, h*W, C)
        # 3. attention, back to images, output projection
        x = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, h*W, C)
        x = x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        x = self.proj(x)
        return x.view(b, t, c, h, w).transpose(1, 2).add_(identity)  # (B, C, T, h, W)


def _check_same_rows(conv: nn.Conv2d | nn.Conv3d) -> None:
    """The halo layers handle 'same'-height convs: stride 1, no dilation, kernel 2 * pad + 1."""
    k, s, d, p = conv.kernel_size[-2], conv.stride[-2], conv.dilation[-2], conv.padding[-2]
    if (s, d, k) != (1, 1, 2 * p + 1) or conv.padding_mode != "zeros":
        raise ValueError(f"{type(conv).__name__} with height kernel {k}, stride {s}, dilation {d}, "
                         f"padding {p} ({conv.padding_mode}) cannot run on row stripes (allowed: "
                         "stride 1, dilation 1, kernel 2 * padding + 1, zero padding)")


def halo_vae_view(vae: WanVAE, stripes: RowStripes) -> WanVAE:
    """A copy of `vae` that shares its parameters, whose `decode` decodes one row stripe.

    Every decoder conv whose kernel spans rows becomes a halo conv, the attention block a
    row-split one; per-pixel layers are kept as they are. `vae` itself is not modified.
    """
    shared = {id(t): t for t in itertools.chain(vae.parameters(), vae.buffers())}
    view = copy.deepcopy(vae, memo=shared)
    for parent in list(view.decoder.modules()):
        for name, child in list(parent.named_children()):
            swap = _swap(child, stripes)
            if swap is not None:
                setattr(parent, name, swap)
    return view


def _swap(module: nn.Module, stripes: RowStripes) -> nn.Module | None:
    """The row-stripe replacement of one decoder module, or None when it is per-pixel in H."""
    if isinstance(module, AttentionBlock):
        return StripeAttentionBlock(module, stripes)
    if isinstance(module, CausalConv3d) and module.kernel_size[1] > 1:
        return HaloCausalConv3d(module, stripes)
    if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
        return HaloConv2d(module, stripes)
    if isinstance(module, (nn.Conv3d, nn.Conv2d)) and module.kernel_size[-2] > 1:
        raise TypeError(f"no row-stripe version of {type(module).__name__}")
    return None


# ---------------------------------------------------------------------------------------------
# The split decode
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def halo_split_decode(vae: WanVAE, latents: Tensor, group: SubGroup, dst: int = 0) -> Tensor | None:
    """Decode normalised latents (B, z, F, h, w) over the ranks of `group`, exactly.

    Every rank passes the same latents and decodes its own stripe of latent rows, exchanging
    halo rows and the attention's keys/values with the others. Returns the video
    (B, 3, 4(F - 1) + 1, s h, s w) (s = `vae.config.spatial_scale`: 8, Wan2.2 16), clamped to
    [-1, 1], on group rank `dst`; None on the others.
    A group of one needs no torch.distributed (it runs the same layers with zero halos).
    """
    if not 0 <= dst < group.size:
        raise ValueError(f"dst must be a rank of the group (0 .. {group.size - 1}), got {dst}")
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, z, F, h, w), got shape {tuple(latents.shape)}")
    stripes = RowStripes(group, stripe_rows(latents.shape[-2], group.size))
    # 1. this rank's latent rows, decoded by the halo view of the VAE (clamping is per pixel)
    mine = latents[..., stripes.start:stripes.start + stripes.rows[group.rank], :]
    pixels = halo_vae_view(vae, stripes).decode_whole(mine)  # (B, 3, F', s rows, s w)
    # 2. the stripes, in rank order, on dst
    return stripes.gather_rows(pixels, dst)

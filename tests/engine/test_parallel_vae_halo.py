"""Halo split VAE decode (engine.parallel.vae_halo): row stripes over gloo ranks give the plain
single-process `vae.decode` to float32 rounding, for latent heights that divide the group size
and that do not (stripes of one latent row included), on whole worlds and on a sub-group."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import this file by basename

from parallel_ranks import build_vae  # noqa: E402  (tiny VAE shared with test_parallel_vae)

from engine.models.wan.vae import CausalConv3d  # noqa: E402
from engine.parallel.mesh import SINGLE, SubGroup  # noqa: E402
from engine.parallel.vae_halo import (  # noqa: E402
    HaloCausalConv3d,
    HaloConv2d,
    RowStripes,
    StripeAttentionBlock,
    halo_split_decode,
    halo_vae_view,
    stripe_rows,
)

REL_TOL = 1e-5
"""float32; measured 4e-7 .. 2e-6 (convs on stripes and the gathered keys sum in other orders)."""


@dataclass(frozen=True)
class Case:
    name: str
    ranks: tuple[int, ...]        # global ranks of the group (in group-rank order)
    shape: tuple[int, ...]        # latents (B, z, F, h, w)
    dst: int = 0                  # group rank receiving the video
    channels_last: bool = False   # decode with WanVAE.to_channels_last()


CASES = {
    2: (
        Case("w2_h6_divides", (0, 1), (1, 4, 3, 6, 5)),
        Case("w2_h5_remainder", (0, 1), (2, 4, 2, 5, 4), dst=1),
        Case("w2_h3_channels_last", (0, 1), (1, 4, 2, 3, 4), channels_last=True),
    ),
    3: (
        Case("w3_h6_divides", (0, 1, 2), (1, 4, 3, 6, 4)),
        Case("w3_h4_one_row_stripes", (0, 1, 2), (1, 4, 3, 4, 5), dst=2),   # rows 2, 1, 1
        Case("w3_h7_remainder", (0, 1, 2), (1, 4, 2, 7, 3), dst=1),         # rows 3, 2, 2
        Case("sub12_h5", (1, 2), (1, 4, 3, 5, 4), dst=1),                   # group {1, 2} of 3
    ),
}


def case_latents(case: Case) -> torch.Tensor:
    seed = sum(case.shape) * 31 + case.dst
    return torch.randn(case.shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Spawned rank: every case of this world size; each case's dst saves the video."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        for case in CASES[world_size]:
            vae = build_vae().to_channels_last() if case.channels_last else build_vae()
            pg = dist.group.WORLD if len(case.ranks) == world_size else dist.new_group(list(case.ranks))
            if rank not in case.ranks:
                continue
            group = SubGroup(pg, len(case.ranks), case.ranks.index(rank))
            video = halo_split_decode(vae, case_latents(case), group, dst=case.dst)
            assert (video is None) == (group.rank != case.dst), (case.name, rank)
            if video is not None:
                torch.save(video, os.path.join(out_dir, f"{case.name}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_halo_split_decode_equals_plain_decode(tmp_path, world_size):
    import test_parallel_vae_halo as this  # the children find _rank_main under this name

    torch.set_num_threads(1)
    mp.spawn(this._rank_main, args=(world_size, str(tmp_path / "rdv"), str(tmp_path)),
             nprocs=world_size, join=True)
    vae = build_vae()
    for case in CASES[world_size]:
        plain = vae.decode(case_latents(case))
        video = torch.load(tmp_path / f"{case.name}.pt")
        b, _, f, h, w = case.shape
        assert video.shape == plain.shape == (b, 3, 4 * (f - 1) + 1, 8 * h, 8 * w), case.name
        err = rel_err(video, plain)
        print(f"{case.name}: relative error {err:.2e}, max abs {float((video - plain).abs().max()):.2e}")
        assert err < REL_TOL, (case.name, err)


def test_group_of_one_equals_plain_decode_and_leaves_the_vae_alone():
    torch.set_num_threads(1)
    vae = build_vae()
    latents = torch.randn(1, 4, 3, 5, 4, generator=torch.Generator().manual_seed(2))
    plain = vae.decode(latents)
    video = halo_split_decode(vae, latents, SINGLE)
    err = rel_err(video, plain)
    assert err < REL_TOL, err
    assert float(video.abs().max()) <= 1.0
    assert rel_err(halo_split_decode(build_vae().to_channels_last(), latents, SINGLE), plain) < REL_TOL
    # the original decoder is untouched; the view shares its weights and swapped its layers
    view = halo_vae_view(vae, RowStripes(SINGLE, (5,)))
    assert vae.decoder.conv_in.padding == (0, 1, 1) and type(vae.decoder.conv_in) is CausalConv3d
    assert isinstance(view.decoder.conv_in, HaloCausalConv3d)
    assert view.decoder.conv_in.conv.weight is vae.decoder.conv_in.weight
    assert isinstance(view.decoder.mid_block.attentions[0], StripeAttentionBlock)
    assert isinstance(view.decoder.up_blocks[0].upsamplers[0].resample[1], HaloConv2d)
    assert torch.equal(vae.decode(latents), plain)


def test_stripe_rows_and_refusals():
    assert stripe_rows(7, 3) == (3, 2, 2)
    assert stripe_rows(6, 3) == (2, 2, 2)
    assert stripe_rows(4, 3) == (2, 1, 1)
    latents = torch.zeros(1, 4, 1, 2, 4)
    three = SubGroup(group=None, size=3, rank=0)  # refused before any communication
    with pytest.raises(ValueError, match="latent height 2 is smaller than the group size 3"):
        halo_split_decode(build_vae(), latents, three)
    with pytest.raises(ValueError, match="dst must be a rank of the group"):
        halo_split_decode(build_vae(), latents, SINGLE, dst=1)

"""The `cfg x ulysses` device mesh over torch.distributed.

Rank layout (world size N = cfg * ulysses):

    rank = cfg_rank * ulysses + ulysses_rank

    cfg 2 x ulysses 2:   ulysses groups {0, 1} (cond), {2, 3} (uncond)
                         cfg groups     {0, 2}, {1, 3}

A Ulysses group holds the ranks that split one branch's tokens; a CFG group holds the ranks that
own the same token slice of the two branches and exchange their predictions. The whole world is a
third group: with guidance off, the cfg ranks have no branch of their own, so every rank joins
one Ulysses split over the world (when the heads divide by N; see `engine.parallel.cfg`).

`torch.distributed.new_group` must be called by every rank for every group in the same order;
`init_mesh` does exactly that and must therefore run on all ranks together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.options import ParallelConfig


@dataclass(frozen=True)
class SubGroup:
    """A process group of some ranks, seen from one member rank."""

    group: dist.ProcessGroup | None
    """None for a group of one (no communication)."""
    size: int
    rank: int
    """This rank's index inside the group."""


SINGLE = SubGroup(group=None, size=1, rank=0)
"""The trivial group: this rank alone."""


@dataclass(frozen=True)
class ParallelMesh:
    """One rank's view of the `cfg x ulysses` mesh."""

    config: ParallelConfig
    rank: int
    device: torch.device
    cfg: SubGroup
    """Ranks with the same token slice of the two guidance branches (size config.cfg)."""
    ulysses: SubGroup
    """Ranks splitting the tokens of one branch (size config.ulysses)."""
    world: SubGroup
    """Every rank (size config.world_size)."""

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def is_single(self) -> bool:
        """True for world size 1: parallelism is a no-op."""
        return self.config.world_size == 1


def single_mesh(device: torch.device | str = "cpu") -> ParallelMesh:
    """The mesh of a lone process (no torch.distributed needed)."""
    return ParallelMesh(config=ParallelConfig(), rank=0, device=torch.device(device),
                        cfg=SINGLE, ulysses=SINGLE, world=SINGLE)


def init_mesh(config: ParallelConfig, device: torch.device | str) -> ParallelMesh:
    """Build the mesh on this rank. Call on every rank of the default process group at once.

    World size 1 needs no process group. Otherwise the default group's size must equal
    `config.world_size`.
    """
    device = torch.device(device)
    if config.world_size == 1:
        return single_mesh(device)
    if not dist.is_initialized():
        raise RuntimeError(
            f"parallel config cfg={config.cfg} x ulysses={config.ulysses} needs torch.distributed "
            "initialised with that many ranks (run it in a cluster.WorkerGroup or spawned processes)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size != config.world_size:
        raise ValueError(
            f"parallel config cfg={config.cfg} x ulysses={config.ulysses} needs world size "
            f"{config.world_size}, but the process group has {world_size} ranks")

    cfg_rank, ulysses_rank = divmod(rank, config.ulysses)

    # Same group-creation order on every rank: all Ulysses groups, then all CFG groups.
    ulysses = SINGLE
    if config.ulysses > 1:
        for c in range(config.cfg):
            ranks = [c * config.ulysses + u for u in range(config.ulysses)]
            group = dist.new_group(ranks)
            if c == cfg_rank:
                ulysses = SubGroup(group, config.ulysses, ulysses_rank)
    cfg = SINGLE
    if config.cfg > 1:
        for u in range(config.ulysses):
            ranks = [c * config.ulysses + u for c in range(config.cfg)]
            group = dist.new_group(ranks)
            if u == ulysses_rank:
                cfg = SubGroup(group, config.cfg, cfg_rank)
    world = SubGroup(dist.group.WORLD, world_size, rank)
    return ParallelMesh(config=config, rank=rank, device=device, cfg=cfg, ulysses=ulysses, world=world)

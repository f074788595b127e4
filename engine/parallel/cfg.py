"""CFG-parallel predictor: a drop-in for `engine.guidance.CFGPredictor` on a `cfg x ulysses` mesh.

With guidance on and cfg = 2, cfg rank 0 runs the conditional branch and cfg rank 1 the
unconditional one (each at batch 1, split over its Ulysses group); the two predictions are
exchanged once per step with one all-gather over the CFG group, and every rank combines them, so
the latents stay identical on all ranks.

With guidance off (`negative_context is None`) there is only one branch. The cfg ranks are not
left idle: all N ranks join one Ulysses split of the conditional branch over the whole world, when
the model's heads divide by N. When they do not (e.g. 12 heads on 8 ranks), the two cfg halves run
the same split redundantly (same result, no speed-up from the cfg ranks); `guidance_off_degree`
says which happens.

With cfg = 1 the single-process predictor runs as is (both branches as two batch-1 forwards, or
one batch-2 forward when `batched`) inside the Ulysses split.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.guidance import CFGPredictor, CombineFn, combine
from engine.parallel.mesh import ParallelMesh, SubGroup
from engine.parallel.ulysses import UlyssesState


class CFGParallelPredictor:
    """Same call signature as `CFGPredictor`; see the module docstring for who computes what."""

    def __init__(self, transformer: nn.Module, mesh: ParallelMesh, state: UlyssesState,
                 guidance_off_group: SubGroup, batched: bool = False, combine_fn: CombineFn = combine) -> None:
        self.transformer = transformer
        self.mesh = mesh
        self.state = state
        self.guidance_off_group = guidance_off_group
        self.combine = combine_fn
        self._both = CFGPredictor(transformer, batched, combine_fn)

    @property
    def guidance_off_degree(self) -> int:
        """How many ranks split the tokens when guidance is off."""
        return self.guidance_off_group.size

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor, negative_context: Tensor | None,
                 guidance_scale: float, image_context: Tensor | None = None) -> Tensor:
        """x (1, C_in, F, H, W); timestep (1,), or (1, L) one per token; context / negative_context
        (1, L_txt, D) or None; image_context (1, 257, D_img) or None. Returns (1, C_out, F, H, W)
        float32 on every rank."""
        # 1. Guidance off: every rank on the one branch (world split when the heads allow).
        if negative_context is None:
            with self.state.use(self.guidance_off_group):
                return self.transformer(x, timestep, context, image_context).float()

        # 2. No cfg ranks: both branches here (CFGPredictor), tokens split over Ulysses.
        if self.mesh.cfg.size == 1:
            with self.state.use(self.mesh.ulysses):
                return self._both(x, timestep, context, negative_context, guidance_scale, image_context)

        # 3. cfg rank 0: conditional branch; cfg rank 1: unconditional branch.
        branch_context = context if self.mesh.cfg.rank == 0 else negative_context
        with self.state.use(self.mesh.ulysses):
            mine = self.transformer(x, timestep, branch_context, image_context).float()  # (1, C_out, F, H, W)

        # 4. Exchange once per step: [cond, uncond] on every rank, then the guided velocity.
        both = [torch.empty_like(mine) for _ in range(self.mesh.cfg.size)]
        dist.all_gather(both, mine.contiguous(), group=self.mesh.cfg.group)
        cond, uncond = both
        return self.combine(cond, uncond, guidance_scale)

"""Classifier-free guidance: the velocity predictor the denoise loop calls once per step.

`CFGPredictor(transformer)(x, timestep, context, negative_context, guidance_scale, image_context)`
returns `uncond + g * (cond - uncond)`. With both branches it runs two batch-1 forwards
(conditional, then unconditional), or with `batched=True` (the engine option) ONE forward
at batch 2 (conditional first); with `negative_context=None` (guidance off) one forward at batch 1
returns the conditional prediction as is. Two batch-1 forwards are the default: on an H200 at the
real sizes (Wan 14B and 1.3B, 480p) they are as fast as the batch-2 forward or up to ~1 % faster,
and the step's activations peak at half the size (docs/BENCHMARKS.md, run 6); batching pays
where one forward leaves the GPU idle (small models, few tokens).

A CFG-parallel predictor (engine/parallel) is a drop-in with the same call signature: each rank
computes one branch and the ranks exchange their predictions.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class GuidedPredictor(Protocol):
    """What the denoise loop needs: latents in, guided velocity out."""

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor, negative_context: Tensor | None,
                 guidance_scale: float, image_context: Tensor | None = None) -> Tensor: ...


def combine(cond: Tensor, uncond: Tensor, guidance_scale: float) -> Tensor:
    """`uncond + g * (cond - uncond)`, computed in float32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + guidance_scale * (cond - uncond)


class CFGPredictor:
    """Runs the transformer on the conditional and (if given) unconditional branch."""

    def __init__(self, transformer: nn.Module, batched: bool = False) -> None:
        self.transformer = transformer
        self.batched = batched

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor, negative_context: Tensor | None,
                 guidance_scale: float, image_context: Tensor | None = None) -> Tensor:
        """
        x: (1, C_in, F, H, W) model input (I2V: noisy latents ++ conditioning on C), model dtype.
        timestep: (1,) float in [0, 1000]. context / negative_context: (1, L, D).
        image_context: (1, 257, D_img) or None. Returns (1, C_out, F, H, W) float32.
        """
        # 1. Guidance off: one conditional forward.
        if negative_context is None:
            return self.transformer(x, timestep, context, image_context).float()

        # 2. Both branches: two batch-1 forwards, or one batch-2 forward [cond, uncond] (batching
        #    needs the branches' contexts as tensors of one shape; a family's own context objects
        #    run as two forwards).
        same_shape = isinstance(context, Tensor) and isinstance(negative_context, Tensor) \
            and context.shape == negative_context.shape
        if not (self.batched and same_shape):
            cond = self.transformer(x, timestep, context, image_context)
            uncond = self.transformer(x, timestep, negative_context, image_context)
            return combine(cond, uncond, guidance_scale)
        x2 = torch.cat([x, x])                                      # (2, C_in, F, H, W)
        t2 = torch.cat([timestep, timestep])                        # (2,)
        ctx2 = torch.cat([context, negative_context])               # (2, L, D)
        img2 = None if image_context is None else torch.cat([image_context, image_context])
        cond, uncond = self.transformer(x2, t2, ctx2, img2).chunk(2)  # (1, C_out, F, H, W) each

        return combine(cond, uncond, guidance_scale)

"""Classifier-free guidance: the velocity predictor the denoise loop calls once per step.

`CFGPredictor(transformer)(x, timestep, context, negative_context, guidance_scale, image_context)`
returns `uncond + g * (cond - uncond)`. With both branches it runs two batch-1 forwards
(conditional, then unconditional), or with `batched=True` (the engine option) ONE forward
at batch 2 (conditional first); with `negative_context=None` (guidance off) one forward at batch 1
returns the conditional prediction as is. Two batch-1 forwards are the default: on an H200 at the
real sizes (Wan 14B and 1.3B, 480p) they are as fast as the batch-2 forward or up to ~1 % faster,
and the step's activations peak at half the size (docs/BENCHMARKS.md, run 6); batching pays
where one forward leaves the GPU idle (small models, few tokens).

How the two predictions are combined is the model's guidance mode (`ModelSpec.guidance`,
`combiner`): "cfg" is the formula above; "cfg_renorm" (Qwen-Image's true CFG) then rescales each
latent token's guided velocity to the norm of its conditional one (`combine_renorm`).

A CFG-parallel predictor (engine/parallel) is a drop-in with the same call signature: each rank
computes one branch and the ranks exchange their predictions.
"""
from __future__ import annotations

import functools
from typing import Callable, Protocol

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


CombineFn = Callable[[Tensor, Tensor, float], Tensor]
"""(cond, uncond, guidance_scale) -> the guided velocity, float32."""


def combine_renorm(cond: Tensor, uncond: Tensor, guidance_scale: float, patch: int = 2) -> Tensor:
    """`combine`, then each token's guided velocity scaled to the norm of its conditional one:
    out = comb * |cond| / |comb|, norms over a token's channels and `patch` x `patch` pixels (the
    DiT's packed token: diffusers' Qwen-Image pipelines take `torch.norm(dim=-1)` of the packed
    (B, L, C * patch**2) predictions). cond, uncond: (B, C, F, H, W) with H, W multiples of patch."""
    comb = combine(cond, uncond, guidance_scale)                                 # (B, C, F, H, W)
    b, c, f, h, w = comb.shape

    def token_norm(x: Tensor) -> Tensor:                                         # (B, 1, F, H/p, 1, W/p, 1)
        tokens = x.view(b, c, f, h // patch, patch, w // patch, patch)
        return torch.linalg.vector_norm(tokens, dim=(1, 4, 6), keepdim=True)

    scale = token_norm(cond.float()) / token_norm(comb)
    return (comb.view(b, c, f, h // patch, patch, w // patch, patch) * scale).view(b, c, f, h, w)


def combiner(mode: str, patch: int = 2) -> CombineFn:
    """The combination of a guidance mode (`ModelSpec.guidance`); `patch` is the DiT's spatial
    patch (`LatentGeometry.patch`), the token of "cfg_renorm"."""
    if mode in ("cfg", "none"):  # "none" never combines (one branch), but the predictor is the same
        return combine
    if mode == "cfg_renorm":
        return functools.partial(combine_renorm, patch=patch)
    raise ValueError(f"unknown guidance mode {mode!r}; known: cfg, cfg_renorm, none")


class CFGPredictor:
    """Runs the transformer on the conditional and (if given) unconditional branch."""

    def __init__(self, transformer: nn.Module, batched: bool = False, combine_fn: CombineFn = combine) -> None:
        self.transformer = transformer
        self.batched = batched
        self.combine = combine_fn

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
        #    needs the branches' contexts as tensors of one shape, and image tokens as one tensor
        #    or none; a family's own context objects, or a list of reference latents, run as two
        #    forwards).
        same_shape = isinstance(context, Tensor) and isinstance(negative_context, Tensor) \
            and context.shape == negative_context.shape \
            and (image_context is None or isinstance(image_context, Tensor))
        if not (self.batched and same_shape):
            cond = self.transformer(x, timestep, context, image_context)
            uncond = self.transformer(x, timestep, negative_context, image_context)
            return self.combine(cond, uncond, guidance_scale)
        x2 = torch.cat([x, x])                                      # (2, C_in, F, H, W)
        t2 = torch.cat([timestep, timestep])                        # (2,)
        ctx2 = torch.cat([context, negative_context])               # (2, L, D)
        img2 = None if image_context is None else torch.cat([image_context, image_context])
        cond, uncond = self.transformer(x2, t2, ctx2, img2).chunk(2)  # (1, C_out, F, H, W) each

        return self.combine(cond, uncond, guidance_scale)

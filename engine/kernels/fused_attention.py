"""Building blocks of fused attention projections (a family's fused attention modules use them).

- `concat_linears(*linears)`: one linear whose output is the concatenation of several linears'
  outputs on the same input (q|k|v in one GEMM), for nn.Linear or engine.quant's 8-bit linears;
- `norm_rope(x, norm, rope, heads, rotate)`: RMSNorm across heads, head split and the rotary
  embedding of interleaved channel pairs in one Triton pass on CUDA (`norm_rope.rms_norm_rope`),
  or the model's own norm and `rotate` elsewhere and under torch.compile (Inductor fuses them).

Which model module becomes which fused module is the family's declaration (its `fusions` seam, e.g.
engine/models/wan/fusions.py), applied by `engine.kernels.fuse_modules`. This file imports no model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from engine.quant import QuantLinear
from engine.requirements import use_triton_kernel

Rope = tuple[Tensor, Tensor]
"""Rotary tables (cos, sin), each (1, L, 1, Dh // 2) float32, one angle per (token, channel pair)."""


def concat_linears(*linears: nn.Module) -> nn.Module:
    """One linear whose output is the concatenation of `linears`' outputs (same input): an
    nn.Linear, or for quantized linears (a pre-quantized checkpoint) the same quantized class."""
    if isinstance(linears[0], QuantLinear):
        return type(linears[0]).concatenated(list(linears))
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    has_bias = any(lin.bias is not None for lin in linears)
    with torch.device("meta"):
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:  # a linear without bias contributes zeros
        biases = [lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features) for lin in linears]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


def norm_rope(x: Tensor, norm: nn.RMSNorm, rope: Rope, heads: int,
              rotate: Callable[[Tensor, Rope], Tensor]) -> Tensor:
    """RMSNorm across heads (over the full width D), head split, rotary embedding of channel pairs
    (2i, 2i+1): (B, L, D) -> (B, L, H, Dh). One Triton pass for CUDA bf16/fp16 rows with a unit
    last stride; elsewhere `rotate(norm(x).unflatten(2, (heads, -1)), rope)` (the model's own
    rotary, so the CPU result is the model's)."""
    if use_triton_kernel(x) and norm.weight is not None and x.stride(-1) == 1:
        from .norm_rope import rms_norm_rope

        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm_rope(x, norm.weight, eps, rope[0], rope[1], heads)
    return rotate(norm(x).unflatten(2, (heads, -1)), rope)

"""Triton kernel: RMSNorm across heads followed by the rotary embedding, in one pass.

What `WanSelfAttention` does to q and k in three eager steps (RMSNorm with weight; rotate channel
pairs (2i, 2i+1) of each head by the token's angles; cast), here one read and one write per row:

  n[c]        = bf16(x[c] * rsqrt(mean_c x[c]^2 + eps) * w[c])      (the norm's output dtype)
  out[2i]     = n[2i] * cos[l, i] - n[2i+1] * sin[l, i]             (float32, then cast)
  out[2i + 1] = n[2i] * sin[l, i] + n[2i+1] * cos[l, i]

`x` may be a strided row view (a chunk of the fused q|k|v projection). Self-contained (imports
only torch and triton), so tests can load a fresh copy with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_rope_kernel(X, W, COS, SIN, O, L, stride_xm, eps,
                          D: tl.constexpr, HALF_DH: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row (token of one batch item): D channels as D // 2 (even, odd) pairs."""
    row = tl.program_id(0).to(tl.int64)
    tok = row % L
    pair = tl.arange(0, BLOCK)
    mask = pair < D // 2
    # 1. even / odd channels of the row, and the norm's scale
    x_ptr = X + row * stride_xm + 2 * pair
    xe = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / D + eps)
    we = tl.load(W + 2 * pair, mask=mask, other=0.0).to(tl.float32)
    wo = tl.load(W + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    ne = (xe * rstd * we).to(O.dtype.element_ty).to(tl.float32)
    no = (xo * rstd * wo).to(O.dtype.element_ty).to(tl.float32)
    # 2. rotate each pair by its token's angle (pair index within the head)
    ang = tok * HALF_DH + pair % HALF_DH
    c = tl.load(COS + ang, mask=mask, other=1.0)
    s = tl.load(SIN + ang, mask=mask, other=0.0)
    o_ptr = O + row * D + 2 * pair
    tl.store(o_ptr, (ne * c - no * s).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + 1, (ne * s + no * c).to(O.dtype.element_ty), mask=mask)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, heads: int) -> torch.Tensor:
    """x (B, L, D) (last dim contiguous, rows may be strided), weight (D,), cos/sin (1, L, 1, Dh // 2)
    float32 -> (B, L, H, Dh) contiguous in x's dtype."""
    bsz, seq, dim = x.shape
    assert x.stride(2) == 1 and x.stride(0) == seq * x.stride(1), "rms_norm_rope: rows must be evenly strided"
    half = dim // heads // 2
    assert cos.shape[1] == seq and cos.shape[-1] == half, f"rope tables {tuple(cos.shape)} vs x {tuple(x.shape)}"
    cos = cos.reshape(seq, half).float().contiguous()
    sin = sin.reshape(seq, half).float().contiguous()
    out = torch.empty((bsz, seq, dim), device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(dim // 2)
    warps = 4 if block <= 1024 else 8
    _rms_norm_rope_kernel[(bsz * seq,)](x, weight, cos, sin, out, seq, x.stride(1), eps,
                                        D=dim, HALF_DH=half, BLOCK=block, num_warps=warps)
    return out.unflatten(2, (heads, -1))

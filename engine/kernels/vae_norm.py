"""Triton kernel: the Wan VAE's RMS norm, optionally followed by SiLU, in one pass.

`engine.models.wan.vae.RMSNorm` (+ SiLU) on a channels-last activation is five eager passes: a
float32 norm reduction, x * inv, * gamma (both on torch's slow strided broadcast path), + bias,
SiLU. Here each pixel's C channels (a contiguous row when the channel dim is the innermost one)
are read once and written once, BLOCK_R rows per program:

  inv = r(scale * r32(1 / max(||x||_2, 1e-12)))       (||x|| reduced in float32)
  y   = r(r(x * inv) * gamma)       (+ bias: y = r(y + bias))
  out = r(y / (1 + exp(-y)))        (silu only)

r() rounds to x's dtype, r32() to float32: the same roundings, in the same order, as the eager
module's steps (each stores in x's dtype; `scale / norm` is torch's reciprocal-then-multiply).
So the output equals eager's except where the float32 norm's last bits (summation order) or
exp/division differ and that moves a rounding: a rare one-ulp difference in x's dtype. In float32
it is eager's result up to float32 rounding. Also as eager: in float16, inv overflows to inf for
rows with ||x|| < scale / 65504 (an all-zero row gives NaN); bf16 has float32's range. Self-contained (imports only torch and triton), so
tests can load a fresh copy with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHANNELS = 1024
"""Widest row handled (a row lives in one program's registers); the Wan VAE uses 96 .. 384."""
_BLOCK_ELEMENTS = 4096
"""Elements per program (BLOCK_R rows x next_pow2(C) channels)."""


@triton.jit
def _rms_norm_act_kernel(X, G, B, O, n_rows, scale,
                         C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """One program per BLOCK_R consecutive rows of C contiguous channels (dense rows: stride C)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    dt = O.dtype.element_ty
    # 1. the rows, and each row's 1 / ||x|| (float32 reduction), times scale, in x's dtype
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
    inv = (tl.div_rn(1.0, tl.maximum(norm, 1e-12)) * scale).to(dt).to(tl.float32)
    # 2. x * inv, * gamma (+ bias), each rounded as the eager steps are
    g = tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = (x * inv[:, None]).to(dt).to(tl.float32)
    y = (y * g[None, :]).to(dt).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = (y + b[None, :]).to(dt).to(tl.float32)
    # 3. SiLU as torch computes it (float32, one rounding on store)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(O + offs, y.to(dt), mask=mask)


def rms_norm_act(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 silu: bool) -> torch.Tensor:
    """x (N, C, ...) with the channel dim innermost and dense (channels-last(-3d), or (N, C) rows);
    gamma, bias: C values (any shape, e.g. (C, 1, 1, 1)) -> `x / ||x||_C * scale * gamma (+ bias)`,
    then SiLU if `silu`, in x's dtype and memory format (see the module docstring for rounding)."""
    if x.dim() < 2 or not x.movedim(1, -1).is_contiguous():
        raise ValueError(f"rms_norm_act needs the channel dim (1) innermost and dense, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    c = x.shape[1]
    if not 0 < c <= MAX_CHANNELS:
        raise ValueError(f"rms_norm_act handles 1 .. {MAX_CHANNELS} channels, got {c}")
    out = torch.empty_like(x)  # x is dense: same strides, so the same memory format
    n_rows = x.numel() // c
    if n_rows == 0:
        return out
    gamma = gamma.reshape(c).contiguous()
    bias_flat = bias.reshape(c).contiguous() if bias is not None else gamma  # unused when HAS_BIAS is False
    block_c = triton.next_power_of_2(c)
    block_r = max(1, _BLOCK_ELEMENTS // block_c)
    grid = (triton.cdiv(n_rows, block_r),)
    _rms_norm_act_kernel[grid](x, gamma, bias_flat, out, n_rows, float(scale),
                               C=c, BLOCK_R=block_r, BLOCK_C=block_c,
                               HAS_BIAS=bias is not None, SILU=silu, num_warps=4)
    return out

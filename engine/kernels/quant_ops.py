"""Triton kernels for 8-bit linears: per-token activation quantization (alone, or after bias +
GELU for the feed-forward's hidden activations) and an INT8 GEMM.

Self-contained (imports only torch and triton), so tests can load a fresh copy of this file with
TRITON_INTERPRET=1 and check the kernels on the CPU.

Numerics (engine/quant/reference.py does the same: the quantization in float32, the product and
scaling in float64):
  scale_x[m] = max_k |x[m, k]| / QMAX            (QMAX = 448 for FP8 e4m3, 127 for INT8)
  x_q[m, k]  = cast(x[m, k] / scale_x[m])        (INT8: round to nearest, clamp to +-127)
  y[m, n]    = (sum_k x_q[m, k] * w_q[n, k]) * scale_x[m] * scale_w[n] + bias[n]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
INT8_MAX = 127.0


@triton.jit
def _store_quantized_row(x, XQ, S, row, offs, mask, stride_qm, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """Quantize one float32 row held in registers (masked lanes 0) and store it with its scale."""
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax / QMAX, 1e-12)
    y = x / scale
    if IS_INT8:
        # round half away from zero, then clamp (the reference does the same)
        y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(XQ + row * stride_qm + offs, y.to(tl.int8), mask=mask)
    else:
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(XQ + row * stride_qm + offs, y.to(tl.float8e4nv), mask=mask)
    tl.store(S + row, scale)


@triton.jit
def _quant_rows_kernel(X, XQ, S, K, stride_xm, stride_qm,
                       QMAX: tl.constexpr, IS_INT8: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: amax over the row, then the quantized row and its scale."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    _store_quantized_row(x, XQ, S, row, offs, mask, stride_qm, QMAX, IS_INT8)


@triton.jit
def _gelu_quant_rows_kernel(X, BIAS, XQ, S, K, stride_xm, stride_qm, HAS_BIAS: tl.constexpr,
                            QMAX: tl.constexpr, IS_INT8: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: bias + GELU (tanh form) in float32, then as _quant_rows_kernel."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
    # 0.5 x (1 + tanh(u)) = x * sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3); 0 on masked lanes
    x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))     # 2 sqrt(2 / pi)
    _store_quantized_row(x, XQ, S, row, offs, mask, stride_qm, QMAX, IS_INT8)


def _row_launch(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Outputs and launch settings of the per-row kernels for x (M, K)."""
    assert x.dim() == 2 and x.stride(1) == 1, "per-row quantization wants a row-contiguous 2-D tensor"
    m, k = x.shape
    is_int8 = kind == "int8"
    xq = torch.empty((m, k), device=x.device, dtype=torch.int8 if is_int8 else torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return xq, scale, dict(QMAX=INT8_MAX if is_int8 else FP8_MAX, IS_INT8=is_int8, BLOCK_K=block, num_warps=warps)


def quant_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization of a 2-D tensor: (M, K) -> (x_q (M, K), scale (M, 1) float32)."""
    xq, scale, meta = _row_launch(x, kind)
    _quant_rows_kernel[(x.shape[0],)](x, xq, scale, x.shape[1], x.stride(0), xq.stride(0), **meta)
    return xq, scale


def gelu_quant_rows(x: torch.Tensor, bias: torch.Tensor | None, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (tanh form) of x (M, K) + bias (K,), computed in float32, quantized per row as
    quant_rows does: one read of x, one write of the 8-bit rows."""
    xq, scale, meta = _row_launch(x, kind)
    _gelu_quant_rows_kernel[(x.shape[0],)](x, bias if bias is not None else scale, xq, scale, x.shape[1],
                                           x.stride(0), xq.stride(0), HAS_BIAS=bias is not None, **meta)
    return xq, scale


@triton.jit
def _int8_gemm_kernel(A, B, SA, SB, BIAS, C, M, N, K,
                      stride_am, stride_bn, stride_cm,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """C (M, N) = (A (M, K) int8 @ B (N, K)^T int8) * SA[m] * SB[n] (+ BIAS[n]); int32 accumulate."""
    # 1. grouped tile order (L2 reuse of B tiles)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    # 2. main loop over K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    am = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    bn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptr = A + am[:, None] * stride_am + offs_k[None, :]
    b_ptr = B + bn[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptr, mask=kmask[None, :], other=0)
            b = tl.load(b_ptr, mask=kmask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    # 3. epilogue: scales, bias, cast, store
    sa = tl.load(SA + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(SB + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptr, out.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), swept by bench/bench_dit.py on one
# H200 at the Wan-14B 480p shapes (M = 32,760; docs/BENCHMARKS.md). The first two are the defaults
# (`default_int8_config`): a wide tile along N for widening layers (N > K: 5120 -> 13824 took 4.51 ms
# against 4.88 ms with the other), a tall one otherwise (13824 -> 5120: 3.93 ms; 5120 -> 5120: equal).
INT8_GEMM_CONFIGS: list[tuple[int, int, int, int, int, int]] = [
    (256, 128, 128, 8, 8, 3),
    (128, 256, 128, 8, 8, 4),
    (128, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (128, 256, 64, 8, 8, 4),
    (64, 128, 128, 8, 4, 4),
    (256, 128, 128, 8, 8, 4),
    (256, 128, 64, 8, 8, 5),
    (128, 128, 128, 8, 4, 5),
    (128, 128, 256, 8, 8, 3),
]
_int8_config: list[tuple[int, int, int, int, int, int] | None] = [None]


def default_int8_config(n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """The tile configuration for an (M, K) x (K, N) product: wide along N when N > K."""
    return INT8_GEMM_CONFIGS[1] if n > k else INT8_GEMM_CONFIGS[0]


def set_int8_gemm_config(cfg: tuple[int, int, int, int, int, int] | None) -> None:
    """Force one tile configuration for every int8_gemm (None: back to the per-shape defaults)."""
    _int8_config[0] = cfg


def int8_gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype,
              config: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """a (M, K) int8, b (N, K) int8, sa (M,) / (M, 1) f32, sb (N,) f32 -> (M, N) out_dtype."""
    m, k = a.shape
    n = b.shape[0]
    assert a.stride(1) == 1 and b.stride(1) == 1 and b.shape[1] == k
    bm, bn, bk, gm, warps, stages = config or _int8_config[0] or default_int8_config(n, k)
    if m <= 64:
        bm, warps = 64, 4
    c = torch.empty((m, n), device=a.device, dtype=out_dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int8_gemm_kernel[grid](a, b, sa.reshape(-1), sb.reshape(-1), bias if bias is not None else sb,
                            c, m, n, k, a.stride(0), b.stride(0), c.stride(0),
                            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                            GROUP_M=gm, EVEN_K=(k % bk == 0), num_warps=warps, num_stages=stages)
    return c

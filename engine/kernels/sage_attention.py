"""SageAttention-style quantized attention in Triton: INT8 Q/K with smoothing, 16-bit P·V.

  1. smooth K: subtract its mean over tokens (softmax is unchanged: q·mean is constant per row);
  2. quantize Q per block of BLOCK_M tokens and K per block of BLOCK_N tokens (per batch and head)
     to INT8 with one float32 scale each; the softmax scale and log2(e) are folded into Q's scale;
  3. flash-attention loop: S = (Q_i8 · K_i8^T) in int32 * scale_q * scale_k, online softmax in
     base 2, P cast to V's dtype (bf16/fp16) and accumulated as P·V in float32;
     or, with `pv_fp8=True` (as SageAttention2), V quantized to FP8 e4m3 per channel (over all
     tokens) and P scaled by 448 into FP8, so P·V also runs on the 8-bit tensor cores.
     Variants (SageConfig): `qk_fp8`, Q and K as FP8 e4m3 per block instead of INT8 (the same
     tensor-core rate on Hopper, no int32 -> float32 conversion of S); `skip_rescale`, the
     accumulator is rescaled only in blocks where some row's running max grew (exact); `tma`
     (FP8 Q/K and P·V, Hopper), the loop with its tiles loaded through TMA descriptors, the
     softmax scale folded into one FMA and the 448 of P into exp2, optionally with Triton's
     warp specialisation (`warp_specialize`). On the H200 at the 14B shape the TMA loop is as
     fast as the pointer loop, not faster (docs/BENCHMARKS.md, run 4; bench/attn_sweep.py).

Self-contained (only torch and triton) so tests can load it fresh with TRITON_INTERPRET=1.
Layout in and out: (B, L, H, D), as engine.attention's backends take.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LOG2_FP8_MAX = tl.constexpr(math.log2(448.0))
HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head sizes the kernels take (a power of two: one tile row per head)."""


@triton.jit
def _load_token_block(X, L, H, stride_xb, stride_xl, stride_xh, BLOCK: tl.constexpr, D: tl.constexpr):
    """This program's block of BLOCK tokens of one (batch, head) of X (B, L, H, D), as float32
    (rows past L read 0), with its indices: (x, bh, blk, offs_l, offs_d, row mask)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_l = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    mask = offs_l[:, None] < L
    x_ptr = X + b.to(tl.int64) * stride_xb + h * stride_xh \
        + offs_l.to(tl.int64)[:, None] * stride_xl + offs_d[None, :]
    x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    return x, bh, blk, offs_l, offs_d, mask


@triton.jit
def _quant_blocks_kernel(X, MEAN, XQ, S, L, H,
                         stride_xb, stride_xl, stride_xh,
                         SCALE_MUL, HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                         IS_FP8: tl.constexpr = False):
    """One program per (block of tokens, batch*head): 8-bit tile (B, H, L, D) and its scale
    (INT8: amax / 127, round half away from zero; IS_FP8: e4m3, amax / 448)."""
    x, bh, blk, offs_l, offs_d, mask = _load_token_block(X, L, H, stride_xb, stride_xl, stride_xh, BLOCK, D)
    if HAS_MEAN:
        x = x - tl.load(MEAN + bh * D + offs_d)[None, :]
        x = tl.where(mask, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    q_ptr = XQ + bh.to(tl.int64) * L * D + offs_l.to(tl.int64)[:, None] * D + offs_d[None, :]
    if IS_FP8:
        scale = tl.maximum(amax / 448.0, 1e-12)
        y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr, y.to(tl.float8e4nv), mask=mask)
    else:
        scale = tl.maximum(amax / 127.0, 1e-12)
        y = x / scale
        y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr, y.to(tl.int8), mask=mask)
    tl.store(S + bh * tl.cdiv(L, BLOCK) + blk, scale * SCALE_MUL)


@triton.jit
def _quant_v_fp8_kernel(X, VS, VT, L, H, LP, stride_xb, stride_xl, stride_xh,
                        BLOCK: tl.constexpr, D: tl.constexpr):
    """V (B, L, H, D) / scale[b, h, d] -> FP8 e4m3, stored transposed (B*H, D, LP)."""
    x, bh, _, offs_l, offs_d, mask = _load_token_block(X, L, H, stride_xb, stride_xl, stride_xh, BLOCK, D)
    y = x / tl.load(VS + bh * D + offs_d)[None, :]
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(VT + bh.to(tl.int64) * D * LP + offs_d[None, :] * LP + offs_l[:, None],
             y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _attn_block(acc, l_i, m_i, q, q_scale, K, KS, V, start_n, LK, stride_vl,
                offs_n, offs_d, BLOCK_N: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr,
                PV_FP8: tl.constexpr, SKIP_RESCALE: tl.constexpr):
    """One K/V block of the online softmax (V: (L, D) rows of stride stride_vl, or with PV_FP8
    the FP8 transpose (D, L) with row stride stride_vl)."""
    cols = start_n + offs_n
    if MASK:
        k = tl.load(K + cols.to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=cols[:, None] < LK, other=0.0)
        if PV_FP8:
            v = tl.load(V + offs_d[:, None] * stride_vl + cols[None, :], mask=cols[None, :] < LK, other=0.0)
        else:
            v = tl.load(V + cols.to(tl.int64)[:, None] * stride_vl + offs_d[None, :],
                        mask=cols[:, None] < LK, other=0.0)
    else:
        k = tl.load(K + cols.to(tl.int64)[:, None] * D + offs_d[None, :])
        if PV_FP8:
            v = tl.load(V + offs_d[:, None] * stride_vl + cols[None, :])
        else:
            v = tl.load(V + cols.to(tl.int64)[:, None] * stride_vl + offs_d[None, :])
    k_scale = tl.load(KS + start_n // BLOCK_N)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * (q_scale * k_scale)     # (BM, BN), log2 units
    if MASK:
        s = tl.where(cols[None, :] < LK, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if SKIP_RESCALE:
        if tl.max(m_new - m_i, axis=0) > 0:  # some row's max grew: rescale (else alpha == 1)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
    else:
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i + tl.sum(p, axis=1)
    if PV_FP8:
        acc = tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(v), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _sage_fwd_kernel(QQ, QS, KQ, KS, V, VS, O, LQ, LK, H,
                     stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                     PV_FP8: tl.constexpr, SKIP_RESCALE: tl.constexpr = False):
    """One program per (block of BLOCK_M queries, batch*head). PV_FP8: V is the FP8 transpose
    (B*H, D, LP) (stride_vb = D * LP, stride_vl = LP, stride_vh = 0) with scales VS (B*H, D)."""
    # 1. this program's queries (int8) and their scale
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(QQ + bh.to(tl.int64) * LQ * D + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=offs_m[:, None] < LQ, other=0.0)
    q_scale = tl.load(QS + bh * tl.cdiv(LQ, BLOCK_M) + pid_m)
    K = KQ + bh.to(tl.int64) * LK * D
    KS_h = KS + bh * tl.cdiv(LK, BLOCK_N)
    if PV_FP8:
        V_h = V + bh.to(tl.int64) * stride_vb
    else:
        V_h = V + b.to(tl.int64) * stride_vb + h * stride_vh
    # 2. online softmax over the full K/V blocks, then the masked tail
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    n_full = (LK // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, q_scale, K, KS_h, V_h, start_n, LK, stride_vl,
                                    offs_n, offs_d, BLOCK_N, D, False, PV_FP8, SKIP_RESCALE)
    if n_full < LK:
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, q_scale, K, KS_h, V_h, n_full, LK, stride_vl,
                                    offs_n, offs_d, BLOCK_N, D, True, PV_FP8, SKIP_RESCALE)
    # 3. normalise and store (B, L, H, D)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * (tl.load(VS + bh * D + offs_d) / 448.0)[None, :]
    o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh \
        + offs_m.to(tl.int64)[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=offs_m[:, None] < LQ)


@triton.jit
def _tma_block(acc, l_i, m_i, q, q_scale, k_desc, v_desc, KS_h, k_row0, v_row0, start_n, LK,
               offs_n, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """One K/V block of the online softmax, tiles through TMA descriptors. P comes out of exp2
    already scaled by 448 (the FP8 e4m3 maximum; l_i carries the same factor, so it cancels)."""
    k = k_desc.load([k_row0 + start_n, 0])                               # (BN, D) FP8
    scale = q_scale * tl.load(KS_h + start_n // BLOCK_N)                 # log2 units
    s = tl.dot(q, tl.trans(k))                                           # (BM, BN) float32
    if MASK:  # the last block: columns past LK are another head's keys (or TMA's zero fill)
        s = tl.where((start_n + offs_n)[None, :] < LK, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)
    p = tl.exp2(s * scale - (m_new - LOG2_FP8_MAX)[:, None])            # <= 448
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = v_desc.load([v_row0, start_n])                                   # (D, BN) FP8, V^T
    acc = tl.dot(p.to(tl.float8e4nv), tl.trans(v), acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _sage_fwd_tma_kernel(QQ, QS, KQ, KS, VT, VS, O, LQ, LK, LP, NBH, H, stride_ob, stride_ol, stride_oh,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr):
    """FP8 Q/K (per block) and FP8 V^T (per channel), tiles loaded by TMA (Hopper): one program
    per (block of BLOCK_M queries, batch*head). Q/K as 2-D (NBH*L, D) descriptors, V^T (NBH*D, LK)
    with row stride LP (columns past LK read as zeros)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_desc = tl.make_tensor_descriptor(QQ, shape=[NBH * LQ, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(KQ, shape=[NBH * LK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(VT, shape=[NBH * D, LK], strides=[LP, 1], block_shape=[D, BLOCK_N])
    q = q_desc.load([bh * LQ + pid_m * BLOCK_M, 0])                     # rows past LQ: unused
    q_scale = tl.load(QS + bh * tl.cdiv(LQ, BLOCK_M) + pid_m)
    KS_h = KS + bh * tl.cdiv(LK, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    n_full = (LK // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, l_i, m_i = _tma_block(acc, l_i, m_i, q, q_scale, k_desc, v_desc, KS_h, bh * LK, bh * D,
                                   start_n, LK, offs_n, BLOCK_N, False)
    if n_full < LK:
        acc, l_i, m_i = _tma_block(acc, l_i, m_i, q, q_scale, k_desc, v_desc, KS_h, bh * LK, bh * D,
                                   n_full, LK, offs_n, BLOCK_N, True)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    out = acc / l_i[:, None] * tl.load(VS + bh * D + offs_d)[None, :]
    o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh \
        + offs_m.to(tl.int64)[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=offs_m[:, None] < LQ)


class SageConfig(NamedTuple):
    """Tile configuration and kernel variant of sage_attention (a plain 4-tuple also works)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    qk_fp8: bool = False
    """Q/K as FP8 e4m3 per block instead of INT8."""
    skip_rescale: bool = False
    """Rescale the accumulator only in blocks where a row's running max grew."""
    tma: bool = False
    """(FP8 P·V, FP8 Q/K) the kernel that loads its tiles through TMA descriptors (Hopper)."""
    warp_specialize: bool = False
    """(tma) Triton's warp specialisation of the K/V loop (producer / consumer warps)."""


# Defaults: the fastest of the sweeps on one H200 at the Wan-14B 480p shape (40 heads x 32,760
# tokens x 128; docs/BENCHMARKS.md): 16-bit P·V (128, 64, 4, 4) 36.9-37.3 ms; FP8 P·V with FP8 Q/K
# (128, 128, 4, 3) 29.5 ms (31.1-31.3 ms with INT8 Q/K); cuDNN SDPA 38-39 ms. skip_rescale was
# 2.3x SLOWER there (the data-dependent branch stops Triton's software pipelining of the loop).
# bench/ sweeps SAGE_CONFIGS (and SAGE_VARIANTS for FP8 P·V).
SAGE_CONFIGS: list[SageConfig] = [SageConfig(*c) for c in [
    (128, 64, 4, 4),
    (128, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
]]
SAGE_VARIANTS: list[SageConfig] = [
    SageConfig(128, 128, 4, 3, skip_rescale=True),
    SageConfig(128, 128, 4, 3, qk_fp8=True),
    SageConfig(128, 128, 4, 3, qk_fp8=True, skip_rescale=True),
    SageConfig(128, 128, 4, 4, qk_fp8=True, skip_rescale=True),
    SageConfig(128, 256, 8, 3, qk_fp8=True, skip_rescale=True),
    SageConfig(128, 256, 8, 2, skip_rescale=True),
    SageConfig(128, 64, 4, 4, qk_fp8=True, skip_rescale=True),
]
"""Hopper variants tried for FP8 P·V (FP8 Q/K, lazy rescale, larger BLOCK_N / deeper pipelines)."""
_sage_config: dict[bool, SageConfig] = {False: SAGE_CONFIGS[0], True: SageConfig(128, 128, 4, 3, qk_fp8=True)}


def _ensure_allocator() -> None:
    """Device-side TMA descriptors need a scratch allocator; give Triton one (torch's caching
    allocator) unless the caller set their own (the setting is per thread / context)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def set_sage_config(cfg: tuple, pv_fp8: bool = False) -> None:
    """Pick the tile configuration sage_attention uses (per P·V precision; bench/ sweeps these)."""
    _sage_config[pv_fp8] = SageConfig(*cfg)


def quantize_blocks(x: torch.Tensor, block: int, scale_mul: float = 1.0,
                    mean: torch.Tensor | None = None, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, H, D) -> int8 (or FP8 e4m3) (B, H, L, D) contiguous and scales (B*H, ceil(L/block))
    float32."""
    bsz, seq, heads, dim = x.shape
    assert x.stride(-1) == 1
    n_blk = triton.cdiv(seq, block)
    xq = torch.empty((bsz, heads, seq, dim), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty((bsz * heads, n_blk), device=x.device, dtype=torch.float32)
    _quant_blocks_kernel[(n_blk, bsz * heads)](
        x, mean if mean is not None else scale, xq, scale, seq, heads,
        x.stride(0), x.stride(1), x.stride(2), scale_mul,
        HAS_MEAN=mean is not None, BLOCK=block, D=dim, IS_FP8=fp8, num_warps=4)
    return xq, scale


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, H, D) -> FP8 transpose (B*H, D, LP) (LP: L padded to 16 for aligned rows) and
    per-channel scales (B*H, D) float32 (amax over all tokens / 448)."""
    bsz, seq, heads, dim = v.shape
    scale = (v.abs().amax(dim=1).float() / 448.0).clamp_min(1e-12)          # (B, H, D)
    scale = scale.reshape(bsz * heads, dim).contiguous()
    lp = triton.cdiv(seq, 16) * 16
    vt = torch.empty((bsz * heads, dim, lp), device=v.device, dtype=torch.float8_e4m3fn)
    block = 64
    _quant_v_fp8_kernel[(triton.cdiv(seq, block), bsz * heads)](
        v, scale, vt, seq, heads, lp, v.stride(0), v.stride(1), v.stride(2), BLOCK=block, D=dim, num_warps=4)
    return vt, scale


class SageInputs(NamedTuple):
    """Quantized operands of one sage_attention call (steps 1-3), as the kernels take them."""

    q: torch.Tensor          # (B, H, Lq, D) int8 / FP8
    q_scale: torch.Tensor    # (B*H, ceil(Lq / BLOCK_M)) float32, softmax scale and log2 e folded in
    k: torch.Tensor          # (B, H, Lk, D) int8 / FP8, smoothed
    k_scale: torch.Tensor    # (B*H, ceil(Lk / BLOCK_N)) float32
    v: torch.Tensor          # (B, Lk, H, D) 16-bit, or with FP8 P·V the FP8 V^T (B*H, D, LP)
    v_scale: torch.Tensor    # (B*H, D) float32 (FP8 P·V; else unused)


def sage_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SageConfig,
                  pv_fp8: bool) -> SageInputs:
    """Steps 1-3 of the module text for one call."""
    dim = q.shape[-1]
    # 1. smooth K: subtract the mean over tokens
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()         # (B, H, D)
    # 2. per-block INT8 (or FP8) Q (softmax scale and log2 e folded into its scale) and K
    q_q, q_s = quantize_blocks(q, cfg.block_m, scale_mul=LOG2E / math.sqrt(dim), fp8=cfg.qk_fp8)
    k_q, k_s = quantize_blocks(k, cfg.block_n, mean=k_mean, fp8=cfg.qk_fp8)
    # 3. (pv_fp8) V to FP8 per channel, transposed so P·V reads K-major tiles
    v_in, v_s = quantize_v_fp8(v) if pv_fp8 else (v, q_s)
    return SageInputs(q_q, q_s, k_q, k_s, v_in, v_s)


def sage_kernel(x: SageInputs, out: torch.Tensor, cfg: SageConfig, pv_fp8: bool) -> torch.Tensor:
    """Step 4, the attention kernel, into `out` (B, Lq, H, D)."""
    bsz, heads, seq, dim = x.q.shape
    seq_k = x.k.shape[2]
    bm, bn = cfg.block_m, cfg.block_n
    grid = (triton.cdiv(seq, bm), bsz * heads)
    if cfg.tma:
        if not (pv_fp8 and cfg.qk_fp8):
            raise ValueError("sage_attention: the TMA kernel takes FP8 Q/K and FP8 P·V (qk_fp8, pv_fp8)")
        _ensure_allocator()
        _sage_fwd_tma_kernel[grid](
            x.q, x.q_scale, x.k, x.k_scale, x.v, x.v_scale, out, seq, seq_k, x.v.shape[-1], bsz * heads, heads,
            out.stride(0), out.stride(1), out.stride(2), BLOCK_M=bm, BLOCK_N=bn, D=dim,
            WARP_SPECIALIZE=cfg.warp_specialize, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out
    v_strides = (x.v.stride(0), x.v.stride(1), 0) if pv_fp8 else (x.v.stride(0), x.v.stride(1), x.v.stride(2))
    _sage_fwd_kernel[grid](x.q, x.q_scale, x.k, x.k_scale, x.v, x.v_scale, out, seq, seq_k, heads, *v_strides,
                           out.stride(0), out.stride(1), out.stride(2),
                           BLOCK_M=bm, BLOCK_N=bn, D=dim, PV_FP8=pv_fp8, SKIP_RESCALE=cfg.skip_rescale,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   config: tuple | None = None, pv_fp8: bool = False) -> torch.Tensor:
    """Quantized attention, q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D) in v's dtype.

    No mask, not causal (the DiT's attention needs neither).
    """
    bsz, seq, heads, dim = q.shape
    assert k.shape == v.shape and k.shape[0] == bsz and k.shape[2:] == q.shape[2:], \
        f"sage_attention: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
    if dim not in HEAD_DIMS:
        raise ValueError(f"sage attention: head dim {dim} is not supported (allowed: {HEAD_DIMS})")
    cfg = SageConfig(*config) if config is not None else _sage_config[pv_fp8]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, device=q.device, dtype=v.dtype)
    return sage_kernel(sage_quantize(q, k, v, cfg, pv_fp8), out, cfg, pv_fp8)

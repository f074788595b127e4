"""Quantized attention backends for engine.attention's registry."""
from __future__ import annotations

import torch
from torch import Tensor

from engine.attention import AttentionBackend, list_backends, register_backend
from engine.requirements import gpu_requirement

from .cudnn_attention import HEAD_DIMS as CUDNN_FP8_HEAD_DIMS, cudnn_fp8_attention, cudnn_fp8_requirement

SAGE_HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head sizes the Triton kernels take (= sage_attention.HEAD_DIMS; that file imports triton)."""


def sage_requirement(device: torch.device, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    """None if the Triton INT8 attention can run on `device`, else the reason."""
    return gpu_requirement(device, min_capability, "8-bit tensor cores")


@torch.library.custom_op("lightx2v::sage_int8_attention", mutates_args=())
def sage_int8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D); one graph node under torch.compile."""
    from .sage_attention import sage_attention

    return sage_attention(q, k, v)


@sage_int8_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape, dtype=v.dtype)


@torch.library.custom_op("lightx2v::sage_fp8_attention", mutates_args=())
def sage_fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """As sage_int8_attention, with P·V in FP8 (V per channel)."""
    from .sage_attention import sage_attention

    return sage_attention(q, k, v, pv_fp8=True)


@sage_fp8_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape, dtype=v.dtype)


def sage_fp8_requirement(device: torch.device) -> str | None:
    """FP8 P·V needs FP8 tensor cores (Ada / Hopper)."""
    return gpu_requirement(device, (8, 9), "FP8 tensor cores")


BACKENDS = (
    AttentionBackend(
        name="sage_int8",
        fn=sage_int8_attention,
        requirement=sage_requirement,
        description="Triton SageAttention-style: smoothed INT8 Q/K per block, 16-bit P·V",
        head_dims=SAGE_HEAD_DIMS,
    ),
    AttentionBackend(
        name="sage_fp8",
        fn=sage_fp8_attention,
        requirement=sage_fp8_requirement,
        description="Triton SageAttention2-style: smoothed FP8 Q/K per block, FP8 P·V (V per channel)",
        head_dims=SAGE_HEAD_DIMS,
    ),
    AttentionBackend(
        name="cudnn_fp8",
        fn=cudnn_fp8_attention,
        requirement=cudnn_fp8_requirement,
        description="cuDNN fused FP8 flash attention (Hopper+): smoothed K, per-tensor FP8 Q/K/V, FP8 P·V",
        head_dims=CUDNN_FP8_HEAD_DIMS,
    ),
)
"""This package's attention backends."""


def register_backends() -> None:
    """Register this package's attention backends (once)."""
    for backend in BACKENDS:
        if backend.name not in list_backends():
            register_backend(backend)

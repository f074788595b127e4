"""Reference math of the 8-bit linears, in plain torch (runs anywhere; float64 accumulation).

This is the definition the GPU kernels are tested against, and the path a quantized model takes on
the CPU. Formats: FP8 e4m3 (max 448) and INT8 (max 127, round half away from zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantFormat:
    """One 8-bit number format."""

    name: str
    dtype: torch.dtype
    qmax: float


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat("fp8", torch.float8_e4m3fn, 448.0),
    "int8": QuantFormat("int8", torch.int8, 127.0),
}


def quantize_rows(x: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: (M, K) -> (q (M, K) fmt.dtype, scale (M, 1) float32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # A tensor divisor: for a Python-number divisor torch on CUDA multiplies by its reciprocal,
    # which can be one ulp off the CPU's quotient; tensor / tensor is the rounded quotient on both,
    # so weights quantize to the same bits on either device (pre-quantized == load-time).
    scale = (amax / torch.full_like(amax, fmt.qmax)).clamp_min(1e-12)
    y = (xf / scale).clamp(-fmt.qmax, fmt.qmax)
    if fmt.dtype == torch.int8:
        y = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return y.to(fmt.dtype), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_rows, in float32."""
    return q.float() * scale


def quantized_linear_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                               bias: torch.Tensor | None, fmt: QuantFormat) -> torch.Tensor:
    """y = (q(x) @ w_q^T) * s_x * s_w + b, x (..., K), w_q (N, K), w_scale (N, 1) -> (..., N)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_q, x_scale = quantize_rows(x2, fmt)                         # (M, K), (M, 1)
    acc = x_q.double() @ w_q.double().t()                          # (M, N), exact for int8
    y = acc * x_scale.double() * w_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*shape[:-1], w_q.shape[0])

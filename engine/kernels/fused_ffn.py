"""The DiT feed-forward over 8-bit linears, with its GELU fused into the hidden activations'
per-token quantization; applied from outside by module swap.

`FeedForward` runs Linear -> GELU (tanh) -> Linear. With FP8 / INT8 linears the second linear
quantizes the GELU output per token; Inductor fuses bias + GELU + quantization into one
reduction kernel, but over the 13,824-wide hidden rows of the 14B model it reads the rows twice
and takes ~1.8 ms per block at 480p (docs/BENCHMARKS.md, run 3's profile). `QuantFeedForward`
does it in one Triton pass (`quant_ops.gelu_quant_rows`: bias + GELU in float32, per-row
quantization from registers), as an opaque op under torch.compile:

    x -> quantize per token (Inductor fuses it into the norm / modulation before)
      -> GEMM 1 without bias (bf16 out) -> bias + GELU + quantize per token (one pass)
      -> GEMM 2 on the 8-bit rows (+ bias)

With 16-bit linears, `GeluFeedForward` puts bias + GELU into the first GEMM's epilogue
(`torch._addmm_activation`, cuBLASLt's GELU_BIAS epilogue, tanh GELU; an extern kernel under
torch.compile), so the 13,824-wide hidden rows are written once instead of written, read and
written again by a separate GELU kernel.

The submodules are the original ones (the state dict keeps its keys). Off CUDA both run the
original math. Numerics: as the unfused path, except that the GELU input is not rounded to 16 bits
after the bias (float32 throughout), which is closer to the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.models.wan.transformer import FeedForward
from engine.modules import swap_modules
from engine.quant import QuantLinear
from engine.requirements import triton_problem


@torch.library.custom_op("lightx2v::gelu_quant_rows", mutates_args=())
def gelu_quant_rows_cuda(h: Tensor, bias: Tensor | None, kind: str) -> tuple[Tensor, Tensor]:
    """h (M, K) bf16, bias (K,) -> (GELU(h + bias) quantized per row (M, K), scales (M, 1) f32)."""
    from .quant_ops import gelu_quant_rows

    return gelu_quant_rows(h, bias, kind)


@gelu_quant_rows_cuda.register_fake
def _(h, bias, kind):
    dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    return h.new_empty(h.shape, dtype=dtype), h.new_empty((h.shape[0], 1), dtype=torch.float32)


class _FusedFeedForward(nn.Module):
    """A FeedForward's modules (keys net.0.proj, net.2) with a fused CUDA path over (M, D) rows;
    off CUDA the original math."""

    def __init__(self, ff: FeedForward) -> None:
        super().__init__()
        self.net = ff.net

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cuda":
            return self.net(x)
        shape = x.shape
        y = self.fused(x.reshape(-1, shape[-1]), self.net[0].proj, self.net[2])
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    def fused(self, x2: Tensor, proj: nn.Module, out: nn.Module) -> Tensor:
        raise NotImplementedError


class QuantFeedForward(_FusedFeedForward):
    """FeedForward (tanh GELU) whose two linears are 8-bit linears of one class; see the module text."""

    def fused(self, x2: Tensor, proj: QuantLinear, out: QuantLinear) -> Tensor:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        h = proj.matmul_quantized(*proj.quantize_input(x2), bias=False)      # (M, hidden) bf16
        h_q, h_scale = gelu_quant_rows_cuda(h, proj.bias, out.fmt.name)       # 8-bit (M, hidden)
        return out.matmul_quantized(h_q, h_scale)                             # (M, D) bf16


class GeluFeedForward(_FusedFeedForward):
    """FeedForward (tanh GELU) over 16-bit nn.Linear layers with bias: bias + GELU in the first
    GEMM's epilogue; see the module text."""

    def fused(self, x2: Tensor, proj: nn.Linear, out: nn.Linear) -> Tensor:
        return out(torch._addmm_activation(proj.bias, x2, proj.weight.t(), use_gelu=True))


def gelu_fusable(module: nn.Module) -> bool:
    """A FeedForward with tanh GELU whose two linears are plain 16-bit nn.Linear with bias."""
    if type(module) is not FeedForward or module.net[0].approximate != "tanh":
        return False
    linears = (module.net[0].proj, module.net[2])
    return all(type(m) is nn.Linear and m.bias is not None
               and m.weight.dtype in (torch.bfloat16, torch.float16) for m in linears)


def fusable(module: nn.Module) -> bool:
    """A FeedForward with tanh GELU whose two linears are 8-bit linears of the same class."""
    if type(module) is not FeedForward:
        return False
    proj, out = module.net[0].proj, module.net[2]
    return (module.net[0].approximate == "tanh" and isinstance(proj, QuantLinear)
            and type(proj) is type(out))


def fuse_ffn(model: nn.Module) -> int:
    """Swap, in place, every fusable FeedForward of `model` for a QuantFeedForward (after
    quantization; needs Triton) and every 16-bit one for a GeluFeedForward; on CUDA only, else
    nothing. Returns the count."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda":
        return 0
    n = swap_modules(model, lambda name, m: gelu_fusable(m), GeluFeedForward)
    if triton_problem() is None:
        n += swap_modules(model, lambda name, m: fusable(m), QuantFeedForward)
    return n

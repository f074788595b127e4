"""A DiT feed-forward over 8-bit linears, with its GELU fused into the hidden activations'
per-token quantization; applied from outside by module swap.

A feed-forward in diffusers' layout (`net.0` a GELU projection with `.proj` (Linear) and
`.approximate`, `net.1` dropout or identity, `net.2` Linear) runs Linear -> GELU (tanh) -> Linear;
which classes qualify is the family's declaration (`engine.dit.Fusions.feed_forwards`). With FP8 /
INT8 linears the second linear quantizes the GELU output per token; Inductor fuses bias + GELU +
quantization into one reduction kernel, but it reads the wide hidden rows twice (profile in
docs/BENCHMARKS.md, run 3). `QuantFeedForward` does it in one Triton pass
(`quant_ops.gelu_quant_rows`: bias + GELU in float32, per-row quantization from registers), as an
opaque op under torch.compile:

    x -> quantize per token (Inductor fuses it into the norm / modulation before)
      -> GEMM 1 without bias (bf16 out) -> bias + GELU + quantize per token (one pass)
      -> GEMM 2 on the 8-bit rows (+ bias)

With 16-bit linears, `GeluFeedForward` puts bias + GELU into the first GEMM's epilogue
(`torch._addmm_activation`, cuBLASLt's GELU_BIAS epilogue, tanh GELU; an extern kernel under
torch.compile), so the wide hidden rows are written once instead of written, read and
written again by a separate GELU kernel.

The submodules are the original ones (the state dict keeps its keys). Off CUDA both run the
original math. Numerics: as the unfused path, except that the GELU input is not rounded to 16 bits
after the bias (float32 throughout), which is closer to the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

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
    """A feed-forward's modules (keys net.0.proj, net.2) with a fused CUDA path over (M, D) rows;
    off CUDA the original math."""

    def __init__(self, ff: nn.Module) -> None:
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


def _parts(module: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(first linear, GELU approximation, second linear) of a diffusers-layout feed-forward, else None."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Sequential) or len(net) != 3:
        return None
    proj, approximate = getattr(net[0], "proj", None), getattr(net[0], "approximate", None)
    if not isinstance(proj, nn.Module) or not isinstance(approximate, str):
        return None
    return proj, approximate, net[2]


def gelu_fusable(module: nn.Module) -> bool:
    """A feed-forward with tanh GELU whose two linears are plain 16-bit nn.Linear with bias."""
    parts = _parts(module)
    if parts is None or parts[1] != "tanh":
        return False
    return all(type(m) is nn.Linear and m.bias is not None
               and m.weight.dtype in (torch.bfloat16, torch.float16) for m in (parts[0], parts[2]))


def fusable(module: nn.Module) -> bool:
    """A feed-forward with tanh GELU whose two linears are 8-bit linears of the same class."""
    parts = _parts(module)
    if parts is None:
        return False
    proj, approximate, out = parts
    return approximate == "tanh" and isinstance(proj, QuantLinear) and type(proj) is type(out)


def fuse_ffn(model: nn.Module, feed_forwards: tuple[type[nn.Module], ...]) -> int:
    """Swap, in place, every fusable feed-forward of `model` (modules of exactly one of the
    `feed_forwards` classes) for a QuantFeedForward (after quantization; needs Triton) and every
    16-bit one for a GeluFeedForward; on CUDA only, else nothing. Returns the count."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda" or not feed_forwards:
        return 0
    n = swap_modules(model, lambda name, m: type(m) in feed_forwards and gelu_fusable(m), GeluFeedForward)
    if triton_problem() is None:
        n += swap_modules(model, lambda name, m: type(m) in feed_forwards and fusable(m), QuantFeedForward)
    return n

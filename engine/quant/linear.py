"""FP8 / INT8 replacements for nn.Linear, and `quantize_model` that swaps them in.

Weights: quantized once at load time, per output channel (w_q (N, K), weight_scale (N,) float32).
Activations: quantized per token on the fly.  On CUDA:
  FP8  -> Triton per-token quantization + torch._scaled_mm with row-wise scales (sm_89+, Triton);
  INT8 -> Triton per-token quantization + a Triton INT8 GEMM (torch._int_mm is a slow path on
          H100/H200) with the scales and bias fused in its epilogue (sm_80+).
Elsewhere (CPU) they run the reference math of engine/quant/reference.py.
"""
from __future__ import annotations

import logging
from typing import Callable, ClassVar

import torch
from torch import nn

from engine.dit import quant_skip_of, skipped
from engine.modules import swap_modules
from engine.requirements import cuda_capability as _cuda_capability, triton_problem

from .reference import FORMATS, QuantFormat, quantize_rows, quantized_linear_reference

log = logging.getLogger(__name__)

def _gpu_requirement(device: torch.device, fmt: str, min_capability: tuple[int, int],
                     gpus: str = "", missing: str | None = None) -> str | None:
    """What `fmt` ("FP8" / "INT8") linears need on `device`: nothing on the CPU (reference math),
    else a CUDA GPU of `min_capability` (`gpus` names them), nothing `missing` (a torch feature
    this torch lacks) and Triton (the per-token activation quantization is a Triton kernel)."""
    if device.type == "cpu":
        return None
    cap = _cuda_capability(device)
    if cap is None:
        return f"{fmt} linears need a CUDA device (or the CPU reference path), got {device}"
    if cap < min_capability:
        return (f"{fmt} linears need compute capability >= {min_capability[0]}.{min_capability[1]}{gpus}, "
                f"this GPU has {cap[0]}.{cap[1]}")
    if missing is not None:
        return missing
    reason = triton_problem()
    return f"{fmt} linears need Triton: {reason}" if reason else None


def fp8_requirement(device: torch.device) -> str | None:
    """None if FP8 linears can run on `device`, else the reason."""
    missing = None if hasattr(torch, "_scaled_mm") else \
        f"FP8 linears need torch._scaled_mm (torch {torch.__version__} lacks it)"
    return _gpu_requirement(device, "FP8", (8, 9), " (Ada/Hopper)", missing)


def int8_requirement(device: torch.device) -> str | None:
    """None if INT8 linears can run on `device`, else the reason."""
    return _gpu_requirement(device, "INT8", (8, 0))


# ----------------------------------------------------------------------------------------------
# CUDA paths, as custom ops so torch.compile treats them as single nodes.

_scaled_mm_bias_ok: list[bool | None] = [None]


def _scaled_mm_takes_bias(device: torch.device) -> bool:
    """Probe once whether row-wise torch._scaled_mm accepts a fused bias on this build."""
    if _scaled_mm_bias_ok[0] is None:
        try:
            a = torch.ones(16, 16, device=device, dtype=torch.float8_e4m3fn)
            s_a = torch.ones(16, 1, device=device)
            s_b = torch.ones(1, 16, device=device)
            b = torch.ones(16, device=device, dtype=torch.bfloat16)
            torch._scaled_mm(a, a.t(), scale_a=s_a, scale_b=s_b, bias=b, out_dtype=torch.bfloat16)
            _scaled_mm_bias_ok[0] = True
        except Exception:
            _scaled_mm_bias_ok[0] = False
    return bool(_scaled_mm_bias_ok[0])


def _quant_rows_cuda(x2: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.kernels.quant_ops import quant_rows

    return quant_rows(x2, fmt.name)


@torch.library.custom_op("lightx2v::fp8_linear", mutates_args=())
def fp8_linear_cuda(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) bf16 -> (M, N) bf16 through torch._scaled_mm with row-wise scales."""
    x_q, x_scale = _quant_rows_cuda(x2, FORMATS["fp8"])
    fuse = bias is not None and _scaled_mm_takes_bias(x2.device)
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                         bias=bias.to(torch.bfloat16) if fuse else None, out_dtype=torch.bfloat16)
    if bias is not None and not fuse:
        y += bias.to(y.dtype)
    return y


@fp8_linear_cuda.register_fake
def _(x2, w_q, w_scale, bias):
    return x2.new_empty((x2.shape[0], w_q.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("lightx2v::int8_linear", mutates_args=())
def int8_linear_cuda(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) -> (M, N) in x2's dtype through the Triton INT8 GEMM."""
    from engine.kernels.quant_ops import int8_gemm

    x_q, x_scale = _quant_rows_cuda(x2, FORMATS["int8"])
    return int8_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype=x2.dtype)


@int8_linear_cuda.register_fake
def _(x2, w_q, w_scale, bias):
    return x2.new_empty((x2.shape[0], w_q.shape[0]))


@torch.library.custom_op("lightx2v::int8_gemm", mutates_args=())
def int8_gemm_cuda(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton INT8 GEMM alone (activations already quantized): one graph node under compile."""
    from engine.kernels.quant_ops import int8_gemm

    return int8_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype=out_dtype)


@int8_gemm_cuda.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


COMPILE_FUSED_QUANT: list[bool] = [True]
"""Under torch.compile, quantize activations in plain torch (the reference math) so Inductor fuses
the per-token quantization into the kernel that produces the activation (norm, modulation, GELU),
and call only the GEMM as an opaque op. False: keep the Triton quant + GEMM op (bench/ compares)."""


def _compiling() -> bool:
    return COMPILE_FUSED_QUANT[0] and torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# Modules


class QuantLinear(nn.Module):
    """nn.Linear with an 8-bit weight (per output channel) and per-token 8-bit activations."""

    fmt: ClassVar[QuantFormat]
    requirement: ClassVar[Callable[[torch.device], str | None]]

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, device=device,
                                                     dtype=self.fmt.dtype))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        """Quantize a loaded nn.Linear's weight per output channel."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=w.device, bias_dtype=w.dtype)
        w_q, w_scale = quantize_rows(w, cls.fmt)                    # (N, K), (N, 1)
        q.weight_q.copy_(w_q)
        q.weight_scale.copy_(w_scale.reshape(-1))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @classmethod
    def concatenated(cls, parts: "list[QuantLinear]") -> "QuantLinear":
        """One quantized linear whose output is the concatenation of `parts`' outputs (same input).
        Per-output-channel weights and scales stack as they are: equal to quantizing the
        concatenated weight, with no requantization."""
        if any(type(p) is not cls for p in parts) or len({p.in_features for p in parts}) != 1:
            raise ValueError(f"{cls.__name__}.concatenated needs {cls.__name__}s of one input width")
        first = parts[0]
        has_bias = any(p.bias is not None for p in parts)
        out = cls(first.in_features, sum(p.out_features for p in parts), bias=has_bias, device="meta")
        out.weight_q = torch.cat([p.weight_q for p in parts])
        out.weight_scale = torch.cat([p.weight_scale for p in parts])
        if has_bias:  # a part without bias contributes zeros
            dtype = next(p.bias.dtype for p in parts if p.bias is not None)
            out.bias = nn.Parameter(torch.cat([
                p.bias.detach() if p.bias is not None else p.weight_scale.new_zeros(p.out_features, dtype=dtype)
                for p in parts]), requires_grad=False)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float32: what the quantized weight stands for."""
        return self.weight_q.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return quantized_linear_reference(x, self.weight_q, self.weight_scale, self.bias, self.fmt)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                # (M, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = self._cuda(x2)                                           # (M, N)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CUDA activations (M, K) -> per-token (x_q, scale (M, 1)): plain torch under
        torch.compile (Inductor fuses it into the producer), else the Triton kernel."""
        if _compiling():
            return quantize_rows(x2, self.fmt)
        return _quant_rows_cuda(x2, self.fmt)

    def matmul_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The GEMM on already quantized activations (CUDA): (M, K) 8-bit, (M, 1) -> (M, N) in
        bf16 (plus the bias unless `bias=False`)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.fmt.name}")


class FP8Linear(QuantLinear):
    """FP8 e4m3 weights and activations, torch._scaled_mm with row-wise scales."""

    fmt = FORMATS["fp8"]
    requirement = staticmethod(fp8_requirement)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if _compiling():
            return self.matmul_quantized(*quantize_rows(x2, self.fmt))  # quantization fused by Inductor
        return fp8_linear_cuda(x2, self.weight_q, self.weight_scale, self.bias)

    def matmul_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor, bias: bool = True) -> torch.Tensor:
        y = torch._scaled_mm(x_q, self.weight_q.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                             out_dtype=torch.bfloat16)
        return y + self.bias.to(y.dtype) if bias and self.bias is not None else y


class Int8Linear(QuantLinear):
    """INT8 weights and activations, Triton INT8 GEMM with fused scales and bias."""

    fmt = FORMATS["int8"]
    requirement = staticmethod(int8_requirement)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        if _compiling():
            x_q, x_scale = quantize_rows(x2, self.fmt)                # fused by Inductor
            return int8_gemm_cuda(x_q, x_scale, self.weight_q, self.weight_scale, self.bias, x2.dtype)
        return int8_linear_cuda(x2, self.weight_q, self.weight_scale, self.bias)

    def matmul_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return int8_gemm_cuda(x_q, x_scale, self.weight_q, self.weight_scale, self.bias if bias else None,
                              torch.bfloat16)


QUANT_MODES: dict[str, type[QuantLinear]] = {"fp8": FP8Linear, "int8": Int8Linear}
"""Quantization mode name -> linear class. "none" means no swap."""


def list_quant_modes() -> list[str]:
    return ["none", *QUANT_MODES]


def check_quantization(mode: str, device: torch.device | str) -> None:
    """Raise ValueError/RuntimeError at start-up if `mode` is unknown or cannot run on `device`."""
    if mode == "none":
        return
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {list_quant_modes()}, got {mode!r}")
    reason = QUANT_MODES[mode].requirement(torch.device(device))
    if reason:
        raise RuntimeError(f"quantization={mode!r} cannot run here: {reason}")


def quantize_model(model: nn.Module, mode: str, skip: tuple[str, ...] | None = None) -> nn.Module:
    """Swap every nn.Linear of `model` whose name matches no `skip` pattern (fnmatch on the whole
    name or its last component; default: the model's declared `quant_skip`, an engine.dit seam)
    for the `mode` quantized linear.

    In place (returns the model). Weights are quantized on the device they live on. Raises at
    once if the mode is unknown or cannot run on the model's device, and (TypeError) if `skip` is
    not given and the model declares no `quant_skip`.
    """
    if mode == "none":
        return model
    skip = quant_skip_of(model) if skip is None else skip
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    check_quantization(mode, device)
    cls = QUANT_MODES[mode]
    count = swap_modules(model, lambda name, m: type(m) is nn.Linear and not skipped(name, skip), cls.from_linear)
    log.info("quantized %d linear layers to %s", count, mode)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (weight memory per mode)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

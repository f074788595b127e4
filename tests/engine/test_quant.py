"""FP8 / INT8 linears: reference numerics on the CPU, module swap, start-up refusals; GPU kernels
against the reference when a GPU is there."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from engine.quant import (FORMATS, FP8Linear, Int8Linear, QuantLinear, check_quantization,
                          dequantize_rows, quantize_model, quantize_rows, weight_bytes)
from engine.quant import linear as qlinear

sys.path.insert(0, os.path.dirname(__file__))
from parallel_ranks import dit_inputs  # noqa: E402

torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantize_rows_roundtrip(fmt):
    torch.manual_seed(0)
    x = torch.randn(33, 70) * torch.rand(33, 1) * 10
    q, s = quantize_rows(x, FORMATS[fmt])
    assert q.dtype == FORMATS[fmt].dtype and s.shape == (33, 1)
    # the largest element of each row lands exactly on +-qmax
    assert torch.allclose(q.float().abs().amax(1), torch.full((33,), FORMATS[fmt].qmax))
    err = (dequantize_rows(q, s) - x).abs()
    if fmt == "int8":
        assert (err <= s / 2 + 1e-6).all()                    # half a step at most
    else:
        assert (err <= x.abs() / 16 + s * 2 ** -9 + 1e-6).all()  # 3 mantissa bits (+ subnormals)


@pytest.mark.parametrize("cls,tol", [(FP8Linear, 0.06), (Int8Linear, 0.02)])
def test_quant_linear_matches_dequantized_math(cls, tol):
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 7, 64)
    q = cls.from_linear(lin)
    y = q(x)
    assert y.shape == (2, 7, 48) and y.dtype == x.dtype
    # independent computation: dequantize both operands, multiply in float64
    xq, xs = quantize_rows(x.reshape(-1, 64), cls.fmt)
    ref = dequantize_rows(xq, xs).double() @ q.dequantized_weight().double().t() + lin.bias.double()
    assert rel(y.reshape(-1, 48), ref) < 1e-6
    # and close to the float linear it replaced
    assert rel(y, lin(x)) < tol


def test_quant_linear_without_bias_and_weight_scales():
    torch.manual_seed(2)
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight[3] *= 100.0                                # one loud output channel
    q = Int8Linear.from_linear(lin)
    assert q.bias is None
    # per-output-channel scales: the loud row does not wash out the others
    assert rel(q.dequantized_weight()[:3], lin.weight[:3]) < 0.01
    x = torch.randn(5, 32)
    assert rel(q(x)[:, :3], lin(x)[:, :3]) < 0.02


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(d, d)
        self.norm = nn.Module()
        self.norm.linear = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.ffn(self.attn.to_q(x) + self.norm.linear(x))


class _Tiny(nn.Module):
    quant_skip = ("condition_embedder*", "proj_out", "*norm*")  # the engine.dit seam

    def __init__(self, d: int = 32):
        super().__init__()
        self.condition_embedder = nn.Module()
        self.condition_embedder.time_proj = nn.Linear(d, d)
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.proj_out = nn.Linear(d, 8)

    def forward(self, x):
        x = self.condition_embedder.time_proj(x)
        for b in self.blocks:
            x = b(x)
        return self.proj_out(x)


@pytest.mark.parametrize("mode,cls,tol", [("fp8", FP8Linear, 0.08), ("int8", Int8Linear, 0.02)])
def test_quantize_model_swaps_only_block_linears(mode, cls, tol):
    torch.manual_seed(3)
    model = _Tiny().eval()
    x = torch.randn(2, 5, 32)
    ref = model(x)
    before = weight_bytes(model)
    quantize_model(model, mode)
    assert type(model.condition_embedder.time_proj) is nn.Linear
    assert type(model.proj_out) is nn.Linear
    assert type(model.blocks[0].norm.linear) is nn.Linear        # "*norm*" kept
    for b in model.blocks:
        assert isinstance(b.attn.to_q, cls)
        assert isinstance(b.ffn[0], cls) and isinstance(b.ffn[2], cls)
    assert weight_bytes(model) < before
    assert rel(model(x), ref) < tol


def test_quantize_model_custom_skip_and_none():
    model = _Tiny()
    assert quantize_model(model, "none") is model
    assert type(model.blocks[0].attn.to_q) is nn.Linear
    quantize_model(model, "int8", skip=("blocks.0.*",))
    assert type(model.blocks[0].attn.to_q) is nn.Linear
    assert isinstance(model.blocks[1].attn.to_q, Int8Linear)
    assert isinstance(model.proj_out, Int8Linear)                # declared skip replaced


def test_quantize_model_needs_a_declared_or_given_skip():
    with pytest.raises(TypeError, match="Sequential does not declare `quant_skip`"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8")
    model = quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8", skip=())
    assert isinstance(model[0], Int8Linear)


def test_wan_transformer_declares_the_skipped_linears():
    from engine.models.wan.transformer import WanTransformer

    assert {"condition_embedder*", "proj_out", "*norm*", "*scale_shift_table*"} <= set(WanTransformer.quant_skip)


def test_quantize_model_frees_each_original_as_it_goes(monkeypatch):
    """Peak weight memory: when layer k is quantized, layers 0..k-1 must already be gone (not the
    whole high-precision model held beside its 8-bit copy until the end)."""
    import weakref

    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    refs = [weakref.ref(m) for m in model]
    alive: list[int] = []
    original = Int8Linear.from_linear.__func__

    def spy(cls, linear):
        alive.append(sum(r() is not None for r in refs))
        return original(cls, linear)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(spy))
    quantize_model(model, "int8", skip=())
    assert alive == [4, 3, 2, 1]
    assert all(isinstance(m, Int8Linear) for m in model)


def test_quantize_wan_transformer_forward():
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer

    torch.manual_seed(4)
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                       ffn_dim=64, num_layers=2, text_dim=32, freq_dim=16)
    model = WanTransformer(cfg).eval()
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 6, 32)
    with torch.no_grad():
        ref = model(x, t, ctx)
        quantize_model(model, "int8")
        n_q = sum(isinstance(m, QuantLinear) for m in model.modules())
        out = model(x, t, ctx)
    assert n_q == 2 * (4 + 4 + 2)                                 # q,k,v,o x2 attentions + ffn
    assert not isinstance(model.proj_out, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in model.condition_embedder.modules())
    assert rel(out, ref) < 0.05


def test_refusals_name_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="quantization must be one of \\['none', 'fp8', 'int8'\\]"):
        check_quantization("int4", "cpu")
    check_quantization("fp8", "cpu")                              # reference path is fine
    monkeypatch.setattr(qlinear, "_cuda_capability", lambda device: (8, 0))
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        check_quantization("fp8", "cuda")
    monkeypatch.setattr(qlinear, "_cuda_capability", lambda device: (7, 5))
    with pytest.raises(RuntimeError, match="INT8 linears need compute capability >= 8.0"):
        check_quantization("int8", "cuda")
    monkeypatch.setattr(qlinear, "_cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(qlinear, "triton_problem", lambda: "triton is not importable (test)")
    for mode, fmt in (("fp8", "FP8"), ("int8", "INT8")):   # both run Triton activation quantization
        with pytest.raises(RuntimeError, match=f"{fmt} linears need Triton: triton is not importable"):
            check_quantization(mode, "cuda")
    monkeypatch.setattr(qlinear, "_cuda_capability", lambda device: None)
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        quantize_model(_Tiny().to("meta"), "int8")


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA paths against the reference math


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [FP8Linear, Int8Linear])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_kernels_match_reference(cls, bias):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(5)
    lin = nn.Linear(320, 272, bias=bias).cuda().to(torch.bfloat16)
    q = cls.from_linear(lin)
    x = torch.randn(3, 111, 320, device="cuda", dtype=torch.bfloat16)
    y = q(x)
    ref = qlinear.quantized_linear_reference(x.cpu().float(), q.weight_q.cpu(), q.weight_scale.cpu(),
                                             None if q.bias is None else q.bias.cpu().float(), cls.fmt)
    assert y.dtype == torch.bfloat16
    assert rel(y.float().cpu(), ref) < 1e-2                       # bf16 output rounding


def test_loader_applies_engine_options_quantization(tiny_wan_dir):
    """EngineOptions.quantization reaches the DiT through the family loader (tiny-wan, CPU)."""
    from engine.families import get_family
    from engine.checkpoint import resolve_checkpoint
    from engine.options import EngineOptions

    ckpt = resolve_checkpoint(str(tiny_wan_dir))
    family = get_family(ckpt.spec.family)
    plain = family.load_dits(ckpt, EngineOptions())["transformer"]
    quant = family.load_dits(ckpt, EngineOptions(quantization="fp8"))["transformer"]
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    n_blocks = len(quant.blocks)
    assert sum(isinstance(m, FP8Linear) for m in quant.modules()) >= 10 * n_blocks  # q,k,v,o x2 + ffn
    assert not isinstance(quant.proj_out, QuantLinear)
    inputs = dit_inputs(quant.config)
    with torch.no_grad():
        ref = plain(*inputs)
        out = quant(*inputs)
    assert rel(out, ref) < 0.1

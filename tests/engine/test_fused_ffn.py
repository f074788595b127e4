"""The feed-forwards with a fused GELU (engine.kernels.fused_ffn, on Wan's FeedForward): the quantized one (GELU fused
into the hidden activations' quantization) and the 16-bit one (GELU in the first GEMM's epilogue):
which modules each takes, that they keep the state dict and fall back to the original math off
CUDA; on a GPU, that they are as accurate as the unfused feed-forwards, eagerly and under
torch.compile. The kernel itself is checked against the reference math under the
Triton interpreter in test_kernels.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.dit import fusions_of
from engine.kernels.fused_ffn import GeluFeedForward, QuantFeedForward, fusable, fuse_ffn, gelu_fusable
from engine.models.wan.transformer import FeedForward, WanTransformer
from engine.quant import FP8Linear, Int8Linear, quantize_model

torch.set_num_threads(1)
FFN = (FeedForward,)  # what WanTransformer's fusions declare


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized_ffn(mode: str, approximate: str = "tanh", device: str = "cpu", dim: int = 64,
                  hidden: int = 200) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(dim, hidden, dim, approximate)).to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    return quantize_model(model, mode, skip=())


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_fusable_takes_only_tanh_feed_forwards_over_one_quantized_class(mode):
    assert fusable(quantized_ffn(mode)[0])
    assert not fusable(quantized_ffn(mode, approximate="none")[0])     # the image embedder's MLP
    assert not fusable(nn.Sequential(FeedForward(8, 16, 8, "tanh"))[0])  # not quantized
    mixed = quantized_ffn(mode)[0]
    other = Int8Linear if mode == "fp8" else FP8Linear
    mixed.net[2] = other.from_linear(nn.Linear(200, 64))
    assert not fusable(mixed)


def test_fuse_ffn_does_nothing_off_cuda():
    model = quantized_ffn("int8")
    assert fuse_ffn(model, FFN) == 0 and type(model[0]) is FeedForward


def test_fusable_reads_the_diffusers_layout_not_a_class():
    """The kernel side knows no model class: any module with diffusers' feed-forward layout
    qualifies (the family's declaration picks which classes are swapped)."""
    class Other(nn.Module):
        def __init__(self, ff):
            super().__init__()
            self.net = ff.net

    assert fusable(Other(quantized_ffn("int8")[0]))
    assert gelu_fusable(Other(FeedForward(64, 200, 64, "tanh").to(torch.bfloat16)))
    assert not fusable(nn.Linear(4, 4)) and not gelu_fusable(nn.Sequential(nn.Linear(4, 4)))
    assert fusions_of(WanTransformer).feed_forwards == FFN


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_quant_feed_forward_keeps_the_state_dict_and_the_cpu_math(mode):
    model = quantized_ffn(mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 7, 64)
    ref = model(x)
    fused = QuantFeedForward(model[0])
    assert fused.state_dict().keys() == model[0].state_dict().keys()
    assert all(torch.equal(before["0." + k], v) for k, v in fused.state_dict().items())
    assert torch.equal(fused(x), ref)                 # off CUDA: the original math


def test_gelu_fusable_takes_only_16_bit_tanh_feed_forwards_with_biases():
    ff = FeedForward(64, 200, 64, "tanh")
    assert not gelu_fusable(ff)                                          # float32: the parity setting
    assert gelu_fusable(ff.to(torch.bfloat16)) and gelu_fusable(ff.to(torch.float16))
    assert not gelu_fusable(FeedForward(64, 200, 64, "none").to(torch.bfloat16))
    assert not gelu_fusable(quantized_ffn("fp8")[0])
    no_bias = FeedForward(64, 200, 64, "tanh").to(torch.bfloat16)
    no_bias.net[0].proj.bias = None
    assert not gelu_fusable(no_bias)


def test_gelu_feed_forward_keeps_the_state_dict_and_the_cpu_math():
    model = nn.Sequential(FeedForward(64, 200, 64, "tanh")).to(torch.bfloat16)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    ref = model(x)
    fused = GeluFeedForward(model[0])
    assert fused.state_dict().keys() == model[0].state_dict().keys()
    assert torch.equal(fused(x), ref)                 # off CUDA: the original math
    assert fuse_ffn(model, FFN) == 0 and type(model[0]) is FeedForward


@pytest.mark.gpu
def test_gelu_feed_forward_cuda_no_less_accurate_than_unfused():
    """Against float32 math on the same bf16 weights: GELU in the GEMM epilogue (float32 input)
    is as accurate as the unfused path (GELU input rounded to bf16), eagerly and compiled, and
    fuse_ffn swaps it in on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(512, 1536, 512, "tanh")).to("cuda", torch.bfloat16)
    proj, out_lin = model[0].net[0].proj, model[0].net[2]
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16) * 2
    with torch.no_grad():
        h32 = torch.nn.functional.gelu(x.float() @ proj.weight.float().t() + proj.bias.float(), approximate="tanh")
        ref32 = h32 @ out_lin.weight.float().t() + out_lin.bias.float()
        unfused = model(x)
        assert fuse_ffn(model, FFN) == 1 and type(model[0]) is GeluFeedForward
        out = model(x)
        compiled = torch.compile(model)(x)
    assert out.shape == unfused.shape and out.dtype == unfused.dtype
    err_unfused, err_fused, err_compiled = rel(unfused, ref32), rel(out, ref32), rel(compiled, ref32)
    assert err_fused < 1.1 * err_unfused and err_compiled < 1.1 * err_unfused, (err_fused, err_compiled, err_unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_quant_feed_forward_cuda_no_less_accurate_than_unfused(mode):
    """Against float32 math on the dequantized weights: the fused path (GELU in float32) is as
    accurate as the unfused one (GELU input rounded to bf16), eagerly and compiled; the kernel
    equals the reference quantization of GELU(h + bias) on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine.kernels.quant_ops import gelu_quant_rows
    from engine.quant.reference import FORMATS, quantize_rows

    model = quantized_ffn(mode, device="cuda", dim=512, hidden=1536)
    proj, out_lin = model[0].net[0].proj, model[0].net[2]
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16) * 2
    with torch.no_grad():
        h32 = torch.nn.functional.gelu(x.float() @ proj.dequantized_weight().t() + proj.bias.float(), approximate="tanh")
        ref32 = h32 @ out_lin.dequantized_weight().t() + out_lin.bias.float()
        unfused = model(x)
        fused = QuantFeedForward(model[0])
        out = fused(x)
        compiled = torch.compile(fused)(x)
    assert out.shape == unfused.shape and out.dtype == unfused.dtype
    err_unfused, err_fused, err_compiled = rel(unfused, ref32), rel(out, ref32), rel(compiled, ref32)
    assert err_fused < 0.06 and err_compiled < 0.06, (err_fused, err_compiled)
    assert err_fused < 1.1 * err_unfused and err_compiled < 1.1 * err_unfused, (err_fused, err_compiled, err_unfused)
    h = torch.randn(257, 13824, device="cuda", dtype=torch.bfloat16) * 3
    bias = torch.randn(13824, device="cuda", dtype=torch.bfloat16)
    q, s = gelu_quant_rows(h, bias, mode)
    q_ref, s_ref = quantize_rows(torch.nn.functional.gelu(h.float() + bias.float(), approximate="tanh"), FORMATS[mode])
    assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
    mismatch = (q.float() != q_ref.float()).float().mean().item()
    assert mismatch < 1e-3, mismatch

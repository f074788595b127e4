"""cuDNN FP8 attention backend (engine/kernels/cudnn_attention.py).

On CPU: registration and start-up refusal, and the wrapper's numerics (smoothing, per-tensor
scales, the six scale values handed to cuDNN, dequantization) checked by replacing the cuDNN call
with a float emulation of what cuDNN's sdpa_fp8 computes with those scales. On a GPU with the
cuDNN frontend installed: the real kernel against torch SDPA, eager and under torch.compile.
"""
from __future__ import annotations

import pytest
import torch

import engine.kernels  # noqa: F401  (registers the backends)
from engine.attention import get_backend, list_backends
from engine.kernels import cudnn_attention as ca


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()).transpose(1, 2)


def emulated_sdpa_fp8(q8, k8, v8, scales):
    """What cuDNN's sdpa_fp8 computes (inference, no mask): S = Q·K^T * dq * dk / sqrt(D); P =
    exp(S - rowmax) scaled by scale_s and rounded to FP8; O = (P8·V8) * ds * dv / rowsum(P) *
    scale_o, rounded to FP8."""
    dq, dk, dv, ds, ss, so = scales.tolist()
    q, k, v = (t.float().transpose(1, 2) for t in (q8, k8, v8))  # (B, H, L, D)
    s = (q @ k.transpose(-1, -2)) * dq * dk / q.shape[-1] ** 0.5
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * ss).clamp(max=448).to(torch.float8_e4m3fn).float()
    o = (p8 @ v) * ds * dv / p.sum(dim=-1, keepdim=True)
    return (o * so).clamp(-448, 448).to(torch.float8_e4m3fn).transpose(1, 2).contiguous()


def test_registered_and_refused_on_cpu_with_reason():
    assert "cudnn_fp8" in list_backends()
    with pytest.raises(ValueError, match="cudnn_fp8.*needs a CUDA GPU"):
        get_backend("cudnn_fp8", "cpu")


def test_head_dims_declared():
    from engine.attention import AttentionBackend, check_head_dim

    backend = AttentionBackend("x", ca.cudnn_fp8_attention, head_dims=ca.HEAD_DIMS)
    check_head_dim(backend, 128)
    with pytest.raises(ValueError, match="head dim 96"):
        check_head_dim(backend, 96)


def test_quantize_per_tensor_scale_and_range():
    x = torch.randn(2, 50, 3, 64) * 7
    x8, scale = ca.quantize_per_tensor(x)
    assert x8.dtype == torch.float8_e4m3fn
    assert scale.item() == pytest.approx(x.abs().max().item() / 448.0)
    assert x8.float().abs().max().item() <= 448.0
    assert rel(x8.float() * scale, x) < 0.04  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_wrapper_numerics_with_emulated_cudnn(monkeypatch, offset):
    """The wrapper around the cuDNN call is within FP8 error of exact attention; a key offset
    (which softmax ignores) is removed by the smoothing and does not hurt."""
    monkeypatch.setattr(ca, "cudnn_fp8_sdpa", emulated_sdpa_fp8)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 64) for _ in range(3))
    q = q * 2.0  # a peakier softmax than unit scale
    k = k + offset * torch.randn(1, 1, 4, 64)
    out = ca.cudnn_fp8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == v.dtype
    assert rel(out, exact(q, k, v)) < 0.08


def test_wrapper_scales_matter(monkeypatch):
    """The check above can fail: a wrong scale_o (here: none) ruins the result."""
    def wrong(q8, k8, v8, scales):
        scales = scales.clone()
        scales[5] = 1.0
        return emulated_sdpa_fp8(q8, k8, v8, scales)

    monkeypatch.setattr(ca, "cudnn_fp8_sdpa", wrong)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 64, 2, 64) * 0.01 for _ in range(3))
    assert rel(ca.cudnn_fp8_attention(q, k, v), exact(q, k, v)) > 0.5


def _cudnn_ready() -> str | None:
    return ca.cudnn_fp8_requirement(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cudnn_fp8_matches_sdpa_on_gpu(compiled):
    if not torch.cuda.is_available() or _cudnn_ready() is not None:
        pytest.skip(f"needs a Hopper GPU with the cuDNN frontend: {_cudnn_ready() if torch.cuda.is_available() else 'no GPU'}")
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = torch.compile(ca.cudnn_fp8_attention) if compiled else ca.cudnn_fp8_attention
    out = fn(q, k, v)
    assert out.dtype == torch.bfloat16
    assert rel(out, exact(q, k, v)) < 0.08

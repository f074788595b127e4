"""Triton kernels under TRITON_INTERPRET=1 on tiny shapes (CPU, one child process), backend registration and
refusals; the same kernels on a GPU when one is there."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine.attention import get_backend, list_backends  # noqa: E402
from engine.quant.reference import FORMATS, quantize_rows  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from triton_interp import run_interpreted  # noqa: E402

torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SAGE_VARIANT_FLAGS = {"qkfp8": (True, False), "skip": (False, True), "qkfp8_skip": (True, True)}
"""SageConfig (qk_fp8, skip_rescale) variants checked under the interpreter."""


def _cases() -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ri = lambda *s: torch.randint(-127, 128, s, generator=g, dtype=torch.int8)  # noqa: E731
    gemm_cfg = {"config": (32, 32, 32, 2, 4, 1)}
    sage_cfg = {"config": (16, 16, 4, 1)}
    cases = {
        "rows_int8": ("quant_ops.quant_rows", (r(37, 70) * torch.rand(37, 1, generator=g) * 5, "int8"), {}),
        "rows_fp8": ("quant_ops.quant_rows", (r(21, 48), "fp8"), {}),
    }
    for m, n, k in [(37, 45, 70), (64, 32, 64)]:
        for bias in (True, False):
            args = (ri(m, k), ri(n, k), torch.rand(m, 1, generator=g), torch.rand(n, generator=g),
                    r(n) if bias else None, torch.float32)
            cases[f"gemm_{m}_{n}_{k}_{bias}"] = ("quant_ops.int8_gemm", args, gemm_cfg)
    for lq, lk in [(50, 50), (40, 21)]:
        qkv = (r(2, lq, 3, 32), r(2, lk, 3, 32) + 4.0, r(2, lk, 3, 32))
        cases[f"sage_{lq}_{lk}"] = ("sage_attention.sage_attention", qkv, sage_cfg)
        cases[f"sage_fp8_{lq}_{lk}"] = ("sage_attention.sage_attention", qkv, {**sage_cfg, "pv_fp8": True})
        for variant, flags in SAGE_VARIANT_FLAGS.items():
            for pv_fp8 in (False, True):
                cfg = {"config": (16, 16, 4, 1, *flags), "pv_fp8": pv_fp8}
                cases[f"sage_{variant}_{pv_fp8}_{lq}_{lk}"] = ("sage_attention.sage_attention", qkv, cfg)
        tma_cfg = {"config": (16, 16, 4, 1, True, False, True), "pv_fp8": True}
        cases[f"sage_tma_{lq}_{lk}"] = ("sage_attention.sage_attention", qkv, tma_cfg)
    cases["gelu_rows_int8"] = ("quant_ops.gelu_quant_rows", (r(37, 70) * 3, r(70), "int8"), {})
    cases["gelu_rows_fp8"] = ("quant_ops.gelu_quant_rows", (r(21, 48) * 3, None, "fp8"), {})
    # RMSNorm + rotary: x (B, L, 3 * D) viewed as its first D channels (a strided q of q|k|v)
    qkv_x = (r(2, 6, 3 * 24) * 3).to(torch.bfloat16)
    w = (1 + 0.3 * r(24)).to(torch.bfloat16)
    ang = r(1, 6, 1, 6)
    cases["norm_rope"] = ("norm_rope.rms_norm_rope", (qkv_x[..., :24], w, 1e-6, ang.cos(), ang.sin(), 2), {})
    q, k, v = r(1, 32, 2, 32), r(1, 32, 2, 32), r(1, 32, 2, 32)
    cases["sage_plain"] = ("sage_attention.sage_attention", (q, k, v), sage_cfg)
    cases["sage_shift40"] = ("sage_attention.sage_attention", (q, k + 40.0, v), sage_cfg)
    return cases


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    """(inputs, outputs) of every case, the kernels run by the Triton CPU interpreter."""
    cases = _cases()
    return cases, run_interpreted(tmp_path_factory.mktemp("interp"), cases)


def test_quant_rows_int8_matches_reference(interp):
    cases, out = interp
    (x, _), (q, s) = cases["rows_int8"][1], out["rows_int8"]
    q_ref, s_ref = quantize_rows(x, FORMATS["int8"])
    assert torch.equal(s, s_ref)
    assert (q.int() - q_ref.int()).abs().max().item() <= 1       # division rounding at .5 ties
    assert (q.int() != q_ref.int()).float().mean().item() < 0.01


def test_quant_rows_fp8_close_to_reference(interp):
    cases, out = interp
    (x, _), (q, s) = cases["rows_fp8"][1], out["rows_fp8"]
    q_ref, s_ref = quantize_rows(x, FORMATS["fp8"])
    assert q.dtype == torch.float8_e4m3fn and torch.equal(s, s_ref)
    _assert_interpreted_fp8_close(q, q_ref)


def _assert_interpreted_fp8_close(q: torch.Tensor, q_ref: torch.Tensor) -> None:
    """The CPU interpreter's fp8 cast differs from the GPU's round-to-nearest in two ways: it may
    truncate (one fp8 step off), and where rounding carries into the exponent it drops the carry
    (e.g. 126 -> 64, not 128). Both are interpreter artefacts; the GPU tests check exactness.
    One step is |value| / 8 for normal values, 2^-9 among the subnormals (|value| < 2^-6)."""
    diff = (q.float() - q_ref.float()).abs()
    off = diff > torch.clamp(q_ref.float().abs() / 8, min=2.0**-9) + 1e-6
    at_carry = torch.log2(q_ref.float().abs()).frac() == 0
    assert (~off | at_carry).all()
    assert off.float().mean().item() < 0.05


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n,k", [(37, 45, 70), (64, 32, 64)])
def test_int8_gemm_exact(interp, bias, m, n, k):
    cases, out = interp
    name = f"gemm_{m}_{n}_{k}_{bias}"
    (a, b, sa, sb, bvec, _), c = cases[name][1], out[name]
    ref = (a.double() @ b.double().t()) * sa.double() * sb.double()
    if bias:
        ref = ref + bvec.double()
    assert c.shape == (m, n) and c.dtype == torch.float32
    assert rel(c, ref) < 1e-6                                     # int32 accumulation is exact


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("lq,lk", [(50, 50), (40, 21)])
def test_sage_attention_close_to_sdpa(interp, lq, lk):
    cases, out = interp
    (q, k, v), o = cases[f"sage_{lq}_{lk}"][1], out[f"sage_{lq}_{lk}"]
    assert o.shape == q.shape and torch.isfinite(o).all()
    assert rel(o, _sdpa(q, k, v)) < 0.03


@pytest.mark.parametrize("lq,lk", [(50, 50), (40, 21)])
def test_sage_fp8_pv_close_to_sdpa(interp, lq, lk):
    # FP8 P·V on random inputs costs ~3-4 % (see the GPU test); the CPU interpreter's fp8 cast
    # adds its own error (it drops rounding carries), hence the looser bound here.
    cases, out = interp
    (q, k, v), o = cases[f"sage_fp8_{lq}_{lk}"][1], out[f"sage_fp8_{lq}_{lk}"]
    assert o.shape == q.shape and torch.isfinite(o).all()
    assert rel(o, _sdpa(q, k, v)) < 0.1
    assert rel(o, out[f"sage_{lq}_{lk}"]) < 0.1


@pytest.mark.parametrize("variant", list(SAGE_VARIANT_FLAGS))
@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("lq,lk", [(50, 50), (40, 21)])
def test_sage_variants_close_to_sdpa(interp, variant, pv_fp8, lq, lk):
    """FP8 Q/K and the lazy rescale: skip_rescale is exact (same output as the plain kernel up to
    float rounding); FP8 Q/K costs accuracy (3 mantissa bits) but stays close to SDPA."""
    cases, out = interp
    name = f"sage_{variant}_{pv_fp8}_{lq}_{lk}"
    (q, k, v), o = cases[name][1], out[name]
    plain = out[f"sage_fp8_{lq}_{lk}" if pv_fp8 else f"sage_{lq}_{lk}"]
    assert o.shape == q.shape and torch.isfinite(o).all()
    if variant == "skip":
        assert rel(o, plain) < 1e-5
    # the CPU interpreter's fp8 cast truncates and drops rounding carries, hence the loose bounds
    # for FP8 operands; the GPU sweep in bench/ reports the real errors
    assert rel(o, _sdpa(q, k, v)) < (0.15 if (pv_fp8 or "fp8" in variant) else 0.03)


@pytest.mark.parametrize("lq,lk", [(50, 50), (40, 21)])
def test_sage_tma_kernel_matches_the_pointer_kernel(interp, lq, lk):
    """The TMA-descriptor loop computes what the pointer loop with FP8 Q/K computes (the 448 of P
    folded into exp2 and the scale into one FMA: float rounding apart), including the masked
    last key block that reads the next head's keys (lk = 21 with 16-token blocks)."""
    cases, out = interp
    (q, k, v), o = cases[f"sage_tma_{lq}_{lk}"][1], out[f"sage_tma_{lq}_{lk}"]
    assert o.shape == q.shape and torch.isfinite(o).all()
    assert rel(o, out[f"sage_qkfp8_True_{lq}_{lk}"]) < 2e-2
    assert rel(o, _sdpa(q, k, v)) < 0.15


def _gelu_tanh_quant_reference(x, bias, kind):
    h = F.gelu(x.float() + (bias.float() if bias is not None else 0.0), approximate="tanh")
    return quantize_rows(h, FORMATS[kind])


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gelu_quant_rows_matches_reference(interp, kind):
    """Bias + tanh GELU + per-row quantization in one kernel = torch's GELU then quantize_rows."""
    cases, out = interp
    x, bias, _ = cases[f"gelu_rows_{kind}"][1]
    (q, s), (q_ref, s_ref) = out[f"gelu_rows_{kind}"], _gelu_tanh_quant_reference(x, bias, kind)
    assert q.dtype == q_ref.dtype and q.shape == x.shape and s.shape == (x.shape[0], 1)
    assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
    if kind == "int8":
        assert (q.int() - q_ref.int()).abs().max().item() <= 1
    else:
        _assert_interpreted_fp8_close(q, q_ref)
    assert rel(q.float() * s, F.gelu(x + (bias if bias is not None else 0.0), approximate="tanh")) < 0.05


def test_rms_norm_rope_kernel_matches_eager(interp):
    """The fused kernel against the model's own RMSNorm + apply_rope on a strided q view."""
    from engine.models.wan.transformer import apply_rope

    cases, out = interp
    x, w, eps, cos, sin, heads = cases["norm_rope"][1]
    norm = torch.nn.RMSNorm(24, eps=eps).to(torch.bfloat16)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        ref = apply_rope(norm(x).unflatten(2, (heads, -1)), (cos, sin))
    o = out["norm_rope"]
    assert o.shape == ref.shape == (2, 6, 2, 12) and o.dtype == torch.bfloat16
    assert rel(o, ref) < 1e-2                                       # bf16 rounding of the norm


def test_sage_smoothing_removes_the_key_offset(interp):
    """Without smoothing an offset of 40 would eat the INT8 range; with it the error stays small."""
    cases, out = interp
    q, k, v = cases["sage_plain"][1]
    assert rel(out["sage_shift40"], _sdpa(q, k, v)) < 0.03
    assert rel(out["sage_shift40"], out["sage_plain"]) < 0.02


def test_sage_backend_registered_and_refused_on_cpu():
    import engine.kernels  # noqa: F401  (registers the backends)

    assert {"sage_int8", "sage_fp8"} <= set(list_backends())
    for name in ("sage_int8", "sage_fp8"):
        with pytest.raises(ValueError, match=f"{name}.*needs a CUDA GPU"):
            get_backend(name, "cpu")


def test_optimize_transformer_refuses_at_start_up():
    from engine.kernels import compile_blocks, optimize_transformer
    from engine.options import EngineOptions

    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(TypeError, match="Sequential does not declare `repeated_blocks`"):
        compile_blocks(model)
    with pytest.raises(ValueError, match="sage_int8"):
        optimize_transformer(model, EngineOptions(attention="sage_int8"))


@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (777, 512)])
def test_sage_attention_cuda(lq, lk):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine.kernels.sage_attention import SAGE_CONFIGS, sage_attention

    torch.manual_seed(5)
    q = torch.randn(2, lq, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, lk, 4, 128, device="cuda", dtype=torch.bfloat16) + 2
    v = torch.randn(2, lk, 4, 128, device="cuda", dtype=torch.bfloat16)
    ref = _sdpa(q.float(), k.float(), v.float())
    for cfg in SAGE_CONFIGS:
        out = sage_attention(q, k, v, config=cfg)
        assert rel(out.float(), ref) < 0.03, cfg
        out = sage_attention(q, k, v, config=cfg, pv_fp8=True)
        assert rel(out.float(), ref) < 0.06, cfg


@pytest.mark.gpu
def test_int8_gemm_cuda_configs():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine.kernels.quant_ops import INT8_GEMM_CONFIGS, int8_gemm

    torch.manual_seed(6)
    m, n, k = 1000, 768, 640
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(m, 1, device="cuda"), torch.rand(n, device="cuda")
    ref = (a.double() @ b.double().t()) * sa.double() * sb.double()
    for cfg in INT8_GEMM_CONFIGS:
        c = int8_gemm(a, b, sa, sb, None, torch.float32, config=cfg)
        assert rel(c, ref) < 1e-6, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quant_rows_cuda_matches_reference(kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine.kernels.quant_ops import quant_rows

    torch.manual_seed(7)
    x = torch.randn(300, 5120, device="cuda", dtype=torch.bfloat16) * 3
    q, s = quant_rows(x, kind)
    q_ref, s_ref = quantize_rows(x.cpu(), FORMATS[kind])
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6, atol=0)
    mismatch = (q.cpu().float() != q_ref.float()).float().mean().item()
    assert mismatch < 1e-3, mismatch


def test_sage_refuses_unsupported_head_dims_with_a_value_error():
    """A clear ValueError (not an assert that `python -O` strips) before any kernel launch."""
    from engine.kernels.sage_attention import HEAD_DIMS, sage_attention

    q = torch.randn(1, 4, 2, 12)
    with pytest.raises(ValueError, match=r"head dim 12 is not supported \(allowed: \(16, 32"):
        sage_attention(q, q, q)
    # the registered backends carry the same sizes, for the loader's start-up check
    from engine import attention

    for name in ("sage_int8", "sage_fp8"):
        assert attention._BACKENDS[name].head_dims == HEAD_DIMS

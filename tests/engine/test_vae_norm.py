"""The VAE's fused RMS norm (+ SiLU): the Triton kernel under TRITON_INTERPRET=1 against the eager
RMSNorm (CPU, one child process), and the module swap (`VAE_FUSIONS` of
engine/models/wan/fusions.py): same state dict, and on CPU (the eager fallback) the same decode and
encode, bit for bit. On a GPU: the kernel itself."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import fuse_modules
from engine.models.wan.fusions import VAE_FUSIONS, FusedRMSNorm
from engine.models.wan.vae import RMSNorm, WanVAE, WanVAEConfig

sys.path.insert(0, os.path.dirname(__file__))
from parallel_ranks import randomize_norms_  # noqa: E402
from triton_interp import run_interpreted  # noqa: E402

torch.set_num_threads(1)
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cases() -> dict[str, tuple]:
    """name -> (x, gamma, bias, scale, silu): channels-last 5-D (C=96) and 4-D (C=48) activations,
    row counts that leave a partial block, a zero pixel (the norm's clamp), and (N, C) rows."""
    g = torch.Generator().manual_seed(0)
    cases = {}
    for shape in [(2, 96, 3, 4, 6), (1, 96, 2, 3, 5), (3, 48, 5, 7)]:
        c, fmt = shape[1], CL[len(shape)]
        x = (3 * torch.randn(shape, generator=g)).contiguous(memory_format=fmt)
        x[(0, slice(None)) + (0,) * (len(shape) - 2)] = 0.0  # one all-zero pixel
        p_shape = (c,) + (1,) * (len(shape) - 2)
        gamma = 1 + 0.3 * torch.randn(p_shape, generator=g)
        bias = 0.1 * torch.randn(p_shape, generator=g)
        for with_bias in (False, True):
            for silu in (False, True):
                cases[f"{shape}_{with_bias}_{silu}"] = (x, gamma, bias if with_bias else None, c**0.5, silu)
    x = torch.randn(37, 20, generator=g)
    cases["rows"] = (x, 1 + 0.3 * torch.randn(20, generator=g), 0.1 * torch.randn(20, generator=g), 20**0.5, True)
    # bf16 (the interpreter truncates float -> bf16 casts where the GPU rounds to nearest)
    x, gamma, bias, scale, _ = cases["(1, 96, 2, 3, 5)_True_True"]
    cases["bf16"] = (x.bfloat16(), gamma.bfloat16(), bias.bfloat16(), scale, True)
    return cases


def eager(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """The model's own RMSNorm (in x's dtype) with these parameters."""
    norm = RMSNorm(x.shape[1], images=x.dim() == 4, bias=bias is not None, silu=silu).to(x.device, x.dtype)
    with torch.no_grad():
        norm.gamma.copy_(gamma)
        if bias is not None:
            norm.bias.copy_(bias)
        return norm(x)


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    """(inputs, outputs) of every case, the kernel run by the Triton CPU interpreter."""
    pytest.importorskip("triton")
    cases = _cases()
    calls = {name: ("vae_norm.rms_norm_act", args, {}) for name, args in cases.items()}
    return cases, run_interpreted(tmp_path_factory.mktemp("vae_norm"), calls)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 96, 3, 4, 6), (1, 96, 2, 3, 5), (3, 48, 5, 7)])
def test_kernel_matches_eager_float32(interp, shape, with_bias, silu):
    """float32: every rounding step of the kernel is a float32 one, as eager's; only the order of
    the norm's sum differs. The output keeps x's channels-last strides."""
    cases, out = interp
    name = f"{shape}_{with_bias}_{silu}"
    x, gamma, bias, _, _ = cases[name]
    o, ref = out[name], eager(x, gamma, bias, silu)
    assert o.dtype == x.dtype and o.shape == x.shape and o.stride() == x.stride()
    assert o.is_contiguous(memory_format=CL[x.dim()])
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6)
    zero_pixel = (0, slice(None)) + (0,) * (x.dim() - 2)  # the clamp: 0 / 1e-12 = 0, then bias
    expected = torch.zeros(x.shape[1]) if bias is None else bias.flatten()
    torch.testing.assert_close(o[zero_pixel], F.silu(expected) if silu else expected)


def test_kernel_on_plain_rows(interp):
    cases, out = interp
    x, gamma, bias, scale, _ = cases["rows"]
    ref = F.silu(x / x.norm(dim=1, keepdim=True) * scale * gamma + bias)
    torch.testing.assert_close(out["rows"], ref, rtol=1e-5, atol=1e-6)


def _truncate_bf16(v: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 -> float32 by dropping the low 16 bits (the interpreter's cast)."""
    return (v.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def test_kernel_bf16_rounds_where_eager_does(interp):
    """bf16: the Triton 3.x interpreter truncates float -> bf16 casts (the GPU, like torch, rounds
    to nearest: see the GPU test), so the kernel's output must equal eager's chain of steps replayed
    with truncating casts, bit for bit: this checks which steps round, and in which order. Against
    eager itself (round to nearest) the truncations cost ~2 % here."""
    cases, out = interp
    x, gamma, bias, scale, silu = cases["bf16"]
    r, xf = _truncate_bf16, x.float()
    inv = r(torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(1e-12).reciprocal() * scale)
    y = r(r(r(xf * inv) * gamma.float()) + bias.float())
    o = out["bf16"]
    assert o.dtype == torch.bfloat16 and o.stride() == x.stride()
    assert torch.equal(o.float(), r(y / (1 + torch.exp(-y))))
    assert rel(o, eager(x, gamma, bias, silu)) < 3e-2


def test_kernel_refuses_other_layouts():
    pytest.importorskip("triton")
    from engine.kernels.vae_norm import rms_norm_act

    x = torch.randn(1, 8, 2, 3, 4)  # contiguous: channels are not innermost
    with pytest.raises(ValueError, match="innermost and dense"):
        rms_norm_act(x, torch.ones(8), None, 8**0.5, False)
    with pytest.raises(ValueError, match="channels"):
        rms_norm_act(torch.randn(2, 1025), torch.ones(1025), None, 1.0, False)


def test_norm_with_silu_is_norm_then_silu():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4, 5)
    plain, fused = RMSNorm(6, images=False, bias=True), RMSNorm(6, images=False, bias=True, silu=True)
    with torch.no_grad():
        for m in (plain, fused):
            m.gamma.copy_(torch.linspace(0.5, 1.5, 6).view(6, 1, 1, 1))
            m.bias.copy_(torch.linspace(-0.2, 0.2, 6).view(6, 1, 1, 1))
        assert torch.equal(fused(x), F.silu(plain(x)))


def tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, latents_mean=(0.3, -0.5, 0.1, 0.8),
                              latents_std=(1.7, 0.6, 2.2, 1.1))).eval()
    return randomize_norms_(vae)


def test_swap_keeps_parameters_and_flags():
    vae = tiny_vae()
    before = vae.state_dict()
    norms = {name: (m.silu, m.gamma) for name, m in vae.named_modules() if isinstance(m, RMSNorm)}
    assert fuse_modules(vae, VAE_FUSIONS) == len(norms) > 0
    after = vae.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    for name, (silu, gamma) in norms.items():
        m = vae.get_submodule(name)
        assert type(m) is FusedRMSNorm and m.silu == silu and m.gamma is gamma
    assert vae.get_submodule("decoder.up_blocks.0.resnets.0.norm1").silu
    assert not vae.get_submodule("decoder.mid_block.attentions.0.norm").silu
    assert fuse_modules(vae, VAE_FUSIONS) == 0  # already swapped
    vae.load_state_dict(before, strict=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_swapped_vae_equals_original_on_cpu(channels_last):
    """On CPU the fused module runs the eager math: decode and encode are bit-identical."""
    vae = tiny_vae()
    if channels_last:
        vae.to_channels_last()
    fused = copy.deepcopy(vae)
    fuse_modules(fused, VAE_FUSIONS)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 3, 4, 6, generator=g)
    video = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
    assert torch.equal(fused.decode(latents), vae.decode(latents))
    assert torch.equal(fused.encode(video), vae.encode(video))


def exact_math(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """The norm (+ SiLU) in float64 on x's values, no intermediate rounding."""
    xd = x.double()
    y = xd * (x.shape[1] ** 0.5 / xd.norm(dim=1, keepdim=True).clamp_min(1e-12)) * gamma.double()
    if bias is not None:
        y = y + bias.double()
    return y * torch.sigmoid(y) if silu else y


def test_exact_math_matches_eager_float32():
    """The float64 reference of the GPU test is the module's math (checked on CPU)."""
    torch.manual_seed(9)
    x = torch.randn(1, 12, 2, 3, 5)
    gamma, bias = 1 + 0.3 * torch.randn(12, 1, 1, 1), 0.1 * torch.randn(12, 1, 1, 1)
    for b in (None, bias):
        for silu in (False, True):
            assert rel(exact_math(x, gamma, b, silu), eager(x, gamma, b, silu)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 96, 4, 60, 104), (1, 384, 1, 30, 52), (2, 192, 60, 104)])
def test_kernel_cuda_as_accurate_as_eager_bf16(shape):
    """On a GPU (bf16) the kernel is as close to the exact float64 math as the eager module is
    (both round to bf16 along the way, in slightly different places), and keeps x's layout."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from engine.kernels.vae_norm import rms_norm_act

    torch.manual_seed(8)
    c = shape[1]
    x = (3 * torch.randn(shape, device="cuda")).bfloat16().contiguous(memory_format=CL[len(shape)])
    p_shape = (c,) + (1,) * (len(shape) - 2)
    gamma = (1 + 0.3 * torch.randn(p_shape, device="cuda")).bfloat16()
    bias = (0.1 * torch.randn(p_shape, device="cuda")).bfloat16()
    for b in (None, bias):
        for silu in (False, True):
            o = rms_norm_act(x, gamma, b, c**0.5, silu)
            exact = exact_math(x, gamma, b, silu)
            assert o.stride() == x.stride()
            err_kernel, err_eager = rel(o, exact), rel(eager(x, gamma, b, silu), exact)
            assert err_kernel < max(1.5 * err_eager, 1e-3), (b is None, silu, err_kernel, err_eager)


@pytest.mark.gpu
def test_fused_vae_decode_cuda_bf16():
    """The swapped bf16 channels-last VAE (kernel path) decodes as the original does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    vae = tiny_vae().to("cuda", torch.bfloat16).to_channels_last()
    fused = copy.deepcopy(vae)
    fuse_modules(fused, VAE_FUSIONS)
    latents = torch.randn(1, 4, 3, 8, 12, device="cuda")
    assert rel(fused.decode(latents), vae.decode(latents)) < 1e-2

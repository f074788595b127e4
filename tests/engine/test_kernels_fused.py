"""Fused attention projections (the Wan swaps of engine/models/wan/fusions.py on engine.kernels'
generic pieces): the module swap keeps the model's outputs (float32, CPU), keeps the attention
cores, and composes with quantization."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.dit import Fusions
from engine.kernels import fuse_modules
from engine.models.wan.fusions import DIT_FUSIONS, FusedCrossAttention, FusedSelfAttention
from engine.models.wan.transformer import WanDiTConfig, WanTransformer, apply_rope

torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny(image: bool = False) -> WanTransformer:
    torch.manual_seed(0)
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, ffn_dim=32,
                       num_layers=2, text_dim=16, freq_dim=8,
                       image_dim=8 if image else None, added_kv_proj_dim=24 if image else None)
    model = WanTransformer(cfg).eval()
    for p in model.parameters():  # non-trivial norms and biases
        p.data += 0.1 * torch.randn_like(p)
    return model


def inputs(image: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 4, 6, generator=g)
    t = torch.tensor([300.0, 700.0])
    ctx = torch.randn(2, 5, 16, generator=g)
    img = torch.randn(2, 3, 8, generator=g) if image else None
    return x, t, ctx, img


@pytest.mark.parametrize("image", [False, True])
def test_fused_model_matches_original_float32(image):
    model = tiny(image)
    fused = copy.deepcopy(model)
    cores = [b.attn1.core for b in fused.blocks]
    assert fuse_modules(fused) == 2 * len(fused.blocks)  # the model's declared fusions
    assert all(type(b.attn1) is FusedSelfAttention and type(b.attn2) is FusedCrossAttention for b in fused.blocks)
    assert [b.attn1.core for b in fused.blocks] == cores           # the backend / Ulysses seam is kept
    with torch.no_grad():
        ref, out = model(*inputs(image)), fused(*inputs(image))
    assert rel(out, ref) < 1e-5


def test_fused_weights_are_the_concatenation():
    model = tiny()
    a = model.blocks[0].attn1
    f = FusedSelfAttention(a)
    assert torch.equal(f.to_qkv.weight, torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
    assert torch.equal(f.to_qkv.bias, torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
    # state-dict keys of the checkpoint are unchanged before the swap
    assert "blocks.0.attn1.to_q.weight" in model.state_dict()


def test_apply_rope_bf16_equals_float32_math_rounded_once():
    """The model's rotary writes each rotated half straight into bf16: bit-identical to rotating
    in float32 and rounding the stacked result once (the formulation diffusers' parity was
    first proven with), with no float32 (B, L, H, Dh // 2, 2) intermediate."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, 12, generator=g).to(torch.bfloat16)
    ang = torch.randn(1, 7, 1, 6, generator=g)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    ref = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(torch.bfloat16)
    assert torch.equal(apply_rope(x, (cos, sin)), ref)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_fused_then_quantized_matches_quantized(mode):
    """Quantizing the fused q|k|v linear equals quantizing q, k, v apart (per output channel
    weights, the same per-token activation scale), so the fused model tracks the unfused one."""
    from engine.quant import quantize_model

    model = tiny()
    fused = copy.deepcopy(model)
    fuse_modules(fused)
    quantize_model(model, mode)
    quantize_model(fused, mode)
    assert type(fused.blocks[0].attn1.to_qkv).__name__.endswith("Linear")
    assert fused.blocks[0].attn1.to_qkv.out_features == 3 * 24
    with torch.no_grad():
        ref, out = model(*inputs()), fused(*inputs())
    assert rel(out, ref) < 1e-4


def test_optimize_transformer_fuses_only_on_cuda_and_vae_untouched_on_cpu():
    """On CPU the loaders' entry points leave the modules as they are (float32 parity tests keep
    running the model's own code); the swap is a CUDA-only speed step."""
    from engine.kernels import optimize_transformer, optimize_vae
    from engine.options import EngineOptions

    model = optimize_transformer(tiny(), EngineOptions(device="cpu"))
    assert not any(isinstance(m, (FusedSelfAttention, FusedCrossAttention)) for m in model.modules())
    vae = torch.nn.Conv3d(2, 2, 1)
    assert optimize_vae(vae, EngineOptions(device="cpu")) is vae
    assert vae.weight.is_contiguous()


@pytest.mark.gpu
def test_fused_model_on_cuda_bf16():
    """On a GPU (eager: the Triton norm + rotary kernel) the fused bf16 model tracks the original."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    model = tiny().to("cuda", torch.bfloat16)
    fused = copy.deepcopy(model)
    fuse_modules(fused)
    x, t, ctx, _ = inputs()
    args = (x.to("cuda", torch.bfloat16), t.cuda(), ctx.to("cuda", torch.bfloat16))
    with torch.no_grad():
        ref, out = model(*args), fused(*args)
    assert rel(out.float(), ref.float()) < 2e-2


def test_fuse_modules_frees_each_original_as_it_goes():
    """The separate q/k/v projections of module k are freed before module k+1 is fused."""
    import weakref

    model = tiny()
    refs = [weakref.ref(m) for m in model.modules() if type(m) in DIT_FUSIONS.swaps]
    alive: list[int] = []

    def spying(make):
        def swap(module):
            alive.append(sum(r() is not None for r in refs))
            return make(module)
        return swap

    spied = Fusions(swaps={k: spying(v) for k, v in DIT_FUSIONS.swaps.items()})
    assert fuse_modules(model, spied) == len(refs) == 4
    assert alive == [4, 3, 2, 1]


def test_wan_transformer_declares_its_fusions():
    from engine.dit import fusions_of
    from engine.models.wan.fusions import VAE_FUSIONS
    from engine.models.wan.vae import WanVAE

    assert fusions_of(WanTransformer) is DIT_FUSIONS and fusions_of(WanVAE) is VAE_FUSIONS
    assert fuse_modules(tiny(), Fusions()) == 0  # an explicit empty declaration swaps nothing


def test_fused_linear_keeps_a_bias_that_only_some_projections_have():
    from engine.kernels.fused_attention import concat_linears

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4, bias=True), torch.nn.Linear(8, 6, bias=False)
    x = torch.randn(3, 8)
    fused = concat_linears(a, b)
    assert torch.allclose(fused(x), torch.cat([a(x), b(x)], dim=-1), atol=1e-6)

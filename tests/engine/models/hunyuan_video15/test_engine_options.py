"""What the engine offers applies to HunyuanVideo-1.5 through the DiT's seams (CPU): FP8/INT8
linears everywhere but the declared high-precision layers, block offload streaming its dual-stream
blocks, blocks that torch.compile traces whole, bfloat16 end to end."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.models.hunyuan_video15 import tiny
from engine.models.hunyuan_video15.transformer import DiTContext, HunyuanVideo15DiT
from engine.offload import BlockOffload, SyncStreams
from engine.options import EngineOptions

CPU = torch.device("cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def model() -> HunyuanVideo15DiT:
    return tiny.randomize_(HunyuanVideo15DiT(tiny.dit_config()), qk_gain=2.0).eval().requires_grad_(False)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.dit_config()
    x = torch.randn(1, cfg.in_channels, 2, 3, 4, generator=g)
    context = DiTContext(torch.randn(1, 7, cfg.text_embed_dim, generator=g),
                         torch.randn(1, 3, cfg.text_embed_2_dim, generator=g))
    return x, torch.tensor([640.0]), context, torch.randn(1, 16, cfg.image_embed_dim, generator=g)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from engine.checkpoint import resolve_checkpoint

    return resolve_checkpoint(tiny.write_tiny(str(tmp_path_factory.mktemp("hv15"))))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantization_keeps_the_declared_layers(ckpt, mode):
    from engine.families import get_family
    from engine.quant import QuantLinear

    plain = get_family(ckpt.spec.family).load_dits(ckpt, EngineOptions(device="cpu", dtype="float32"))["transformer"]
    dit = get_family(ckpt.spec.family).load_dits(
        ckpt, EngineOptions(device="cpu", dtype="float32", quantization=mode))["transformer"]
    quantized = {n for n, m in dit.named_modules() if isinstance(m, QuantLinear)}
    kept = {n for n, m in dit.named_modules() if type(m) is nn.Linear}
    assert quantized and all(n.startswith("transformer_blocks.") for n in quantized)
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.attn.add_q_proj",
            "transformer_blocks.1.ff_context.net.2"} <= quantized
    assert all(not n.startswith("transformer_blocks.") for n in kept)
    assert {"proj_out", "norm_out.linear", "context_embedder.proj_in", "context_embedder_2.linear_2",
            "image_embedder.linear_1", "time_embed.timestep_embedder.linear_1"} <= kept
    with torch.no_grad():
        assert rel(dit(*inputs()), plain(*inputs())) < 0.05


def test_block_offload_matches_the_plain_model():
    dit = model()
    reference = copy.deepcopy(dit)
    BlockOffload(dit, compute=CPU, storage=CPU, streams=SyncStreams())
    with torch.no_grad():
        for seed in (1, 2):  # the second call runs from the blocks prefetched by the first
            assert rel(dit(*inputs(seed)), reference(*inputs(seed))) < 1e-5


def test_blocks_compile_without_graph_breaks():
    dit = model()
    x, t, context, image = inputs()
    captured = {}
    dit.transformer_blocks[0].register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    with torch.no_grad():
        dit(x, t, context, image)
        explanation = torch._dynamo.explain(dit.transformer_blocks[0])(*captured["args"])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_bfloat16_pipeline(ckpt):
    from stages.pipeline import LocalPipeline
    from stages.request import GenerationRequest

    request = dict(prompt='a sign says "OPEN"', negative_prompt="", num_frames=5, height=48, width=64, steps=2,
                   seed=3, output_type="latent")
    out = {}
    for dtype in ("float32", "bfloat16"):
        pipe = LocalPipeline.from_checkpoint(ckpt, EngineOptions(device="cpu", dtype=dtype))
        out[dtype] = pipe.run(GenerationRequest(**request)).output.latents
    assert torch.isfinite(out["bfloat16"]).all() and rel(out["bfloat16"], out["float32"]) < 0.1


def test_prequantized_checkpoint_loads_to_the_same_dit(ckpt, tmp_path):
    """`lightx2v quantize` writes the DiT in 8 bits; loading it builds the same quantized model."""
    from engine.checkpoint import quantize_checkpoint, resolve_checkpoint
    from engine.families import get_family

    out = quantize_checkpoint(ckpt.path, str(tmp_path / "int8"), "int8")
    options = EngineOptions(device="cpu", dtype="bfloat16", quantization="int8")
    family = get_family(ckpt.spec.family)
    at_load = family.load_dits(ckpt, options)["transformer"]
    stored = family.load_dits(resolve_checkpoint(out), options)["transformer"]
    x, t, context, image = inputs()
    context = DiTContext(context.text.bfloat16(), context.glyph.bfloat16())
    with torch.no_grad():
        assert torch.equal(stored(x.bfloat16(), t, context, image.bfloat16()),
                           at_load(x.bfloat16(), t, context, image.bfloat16()))


def test_compiled_blocks_take_any_prompt_length_without_recompiling(monkeypatch):
    """compile_blocks compiles the blocks with dynamic shapes (the class's `compile_dynamic`): a
    new prompt length reuses the graph (dynamo's guards, here with the eager backend: no codegen)."""
    import functools

    from torch._dynamo.utils import counters

    from engine.kernels.compile import compile_blocks

    monkeypatch.setattr(nn.Module, "compile", functools.partialmethod(nn.Module.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    dit, reference = model(), model()
    compile_blocks(dit)
    x, t, context, image = inputs()
    graphs = []
    with torch.no_grad():
        for length in (5, 7, 9, 12):
            ctx = DiTContext(torch.randn(1, length, context.text.shape[2]), context.glyph)
            assert rel(dit(x, t, ctx, image), reference(x, t, ctx, image)) < 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[-1] == graphs[1], graphs   # the second length makes it dynamic; no graph after

"""Pre-quantized DiT checkpoints (engine/quant/checkpoint.py, `lightx2v quantize`): written once,
loaded with 8-bit linears built on meta; equal to quantizing at load time."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from engine.families import get_family
from engine.checkpoint import resolve_checkpoint
from engine.options import EngineOptions
from engine.quant import FP8Linear, Int8Linear, QuantLinear
from engine.checkpoint import quantize_checkpoint
from engine.quant.checkpoint import QUANT_CONFIG_KEY
from lightx2v.cli import main as cli_main

sys.path.insert(0, os.path.dirname(__file__))
from parallel_ranks import dit_inputs  # noqa: E402

torch.set_num_threads(1)


def family():
    return get_family(resolve_checkpoint("tiny-wan").spec.family)


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module")
def quantized_dirs(tiny_wan_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    return {mode: quantize_checkpoint(tiny_wan_dir, str(root / mode), mode) for mode in ("fp8", "int8")}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode,cls", [("fp8", FP8Linear), ("int8", Int8Linear)])
def test_prequantized_equals_load_time_quantization(tiny_wan_dir, quantized_dirs, mode, cls, device):
    """Same state dict and the same forward, bit for bit; on CUDA through the GPU kernels (fused
    q|k|v over the quantized linears, the fused feed-forward)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    options = EngineOptions(device=device, dtype="bfloat16", quantization=mode)
    at_load = family().load_dits(resolve_checkpoint(tiny_wan_dir), options)["transformer"]
    ckpt = resolve_checkpoint(quantized_dirs[mode])
    pre = get_family(ckpt.spec.family).load_dits(ckpt, options)["transformer"]
    linears = [m for m in pre.modules() if isinstance(m, QuantLinear)]
    assert linears and all(type(m) is cls for m in linears)
    assert not any(type(m) is torch.nn.Linear and "blocks" in name for name, m in pre.named_modules())
    sd_a, sd_p = at_load.state_dict(), pre.state_dict()
    assert sd_a.keys() == sd_p.keys()
    for key in sd_a:
        assert sd_a[key].dtype == sd_p[key].dtype, key
        assert torch.equal(sd_a[key], sd_p[key]), key
    inputs = [t.to(device) if t is not None else None for t in dit_inputs(pre.config)]
    assert torch.equal(forward(pre, inputs), forward(at_load, inputs))


def test_written_files(quantized_dirs, tiny_wan_dir):
    out = quantized_dirs["fp8"]
    with open(os.path.join(out, "transformer", "config.json")) as fh:
        assert json.load(fh)[QUANT_CONFIG_KEY] == {"mode": "fp8"}
    from safetensors import safe_open

    index = json.load(open(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors.index.json")))
    keys = set(index["weight_map"])
    assert any(k.endswith(".weight_q") for k in keys) and any(k.endswith(".weight_scale") for k in keys)
    assert not any(k.startswith("blocks.") and k.endswith("attn1.to_q.weight") for k in keys)
    shard = os.path.join(out, "transformer", next(iter(set(index["weight_map"].values()))))
    with safe_open(shard, "pt") as f:
        key = next(k for k in f.keys() if k.endswith(".weight_q"))
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
    # the other components are the source's files (linked), untouched
    assert os.path.samefile(os.path.join(out, "model_index.json"), os.path.join(tiny_wan_dir, "model_index.json")) \
        or open(os.path.join(out, "model_index.json")).read() == open(os.path.join(tiny_wan_dir, "model_index.json")).read()


def test_other_quantization_refused_naming_both(quantized_dirs):
    ckpt = resolve_checkpoint(quantized_dirs["fp8"])
    for requested in ("none", "int8"):
        with pytest.raises(ValueError, match=f"quantization='{requested}'.*pre-quantized to 'fp8'.*quantization='fp8'"):
            family().load_dits(ckpt, EngineOptions(device="cpu", quantization=requested))["transformer"]


def test_quantize_refusals(quantized_dirs, tiny_wan_dir, tmp_path):
    with pytest.raises(ValueError, match="already pre-quantized"):
        quantize_checkpoint(quantized_dirs["fp8"], str(tmp_path / "again"), "fp8")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(tiny_wan_dir, str(tmp_path / "busy"), "fp8")
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_checkpoint(tiny_wan_dir, str(tmp_path / "new"), "int4")


def test_cli_quantize_then_generate(tiny_wan_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert cli_main(["quantize", tiny_wan_dir, "--quantization", "int8", "-o", out]) == 0
    assert "quantization='int8'" in capsys.readouterr().out
    assert cli_main(["quantize", tiny_wan_dir, "--quantization", "int8", "-o", out]) == 2  # not empty
    from lightx2v import LightX2V

    model = LightX2V.from_pretrained(out, device="cpu", quantization="int8")
    try:
        frames = model.generate("a fox", video_length=5, resolution=(32, 48), seed=1, steps=2,
                                output_type="np")
    finally:
        model.close()
    assert frames.shape == (5, 32, 48, 3)


def test_fused_attention_on_quantized_linears_equals_unfused(quantized_dirs):
    """On CUDA the loader fuses q|k|v after loading; for pre-quantized linears the fused one stacks
    the per-channel weights and scales (no requantization): same outputs as the separate ones."""
    from engine.kernels import fuse_modules

    ckpt = resolve_checkpoint(quantized_dirs["int8"])
    model = family().load_dits(ckpt, EngineOptions(device="cpu", quantization="int8"))["transformer"]
    inputs = dit_inputs(model.config, seed=3)
    ref = forward(model, inputs)
    assert fuse_modules(model) > 0
    fused = [m for n, m in model.named_modules() if n.endswith("to_qkv")]
    assert fused and all(isinstance(m, Int8Linear) for m in fused)
    torch.testing.assert_close(forward(model, inputs), ref, rtol=1e-5, atol=1e-5)


def test_two_experts_are_both_quantized(tmp_path):
    """Wan2.2 A14B: `transformer/` and `transformer_2/` are both written 8-bit, each equal to
    quantizing that expert at load time (and the two stay different experts)."""
    from engine.registry import get_spec

    src = get_spec("tiny-wan2.2-a14b").materialize()
    out = quantize_checkpoint(src, str(tmp_path / "a14b-int8"), "int8")
    options = EngineOptions(device="cpu", dtype="bfloat16", quantization="int8")
    at_load = family().load_dits(resolve_checkpoint(src), options)
    pre = family().load_dits(resolve_checkpoint(out), options)
    assert sorted(pre) == ["transformer", "transformer_2"]
    for name in pre:
        with open(os.path.join(out, name, "config.json")) as fh:
            assert json.load(fh)[QUANT_CONFIG_KEY] == {"mode": "int8"}
        sd_a, sd_p = at_load[name].state_dict(), pre[name].state_dict()
        assert sd_a.keys() == sd_p.keys() and all(torch.equal(sd_a[k], sd_p[k]) for k in sd_a), name
    inputs = dit_inputs(pre["transformer"].config)
    assert not torch.equal(forward(pre["transformer"], inputs), forward(pre["transformer_2"], inputs))

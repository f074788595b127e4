"""The Qwen-Image family outside the pipeline parity: registry names, folder detection and refusals,
true CFG's norm rescale on unpacked latents, the request's images, the DiT's seams."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import find_spec, resolve_checkpoint
from engine.guidance import combine, combine_renorm, combiner
from engine.models.qwen_image.pipelines import REFERENCE_AREA, area_dimensions
from engine.models.qwen_image.transformer import QwenImageDiTConfig, QwenImageTransformer, pack
from engine.registry import get_spec
from stages.request import GenerationRequest, RequestError


@pytest.fixture(scope="module")
def tiny_edit_dir():
    return get_spec("tiny-qwen-image-edit").materialize()


def image(width: int, height: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))


def test_registry_names_and_aliases():
    for name, entry in (("Qwen-Image", "qwen-image"), ("Qwen/Qwen-Image-Edit-2511", "qwen-image-edit-2511"),
                        ("qwen-image-edit-2509", "qwen-image-edit-2509"), ("Qwen/Qwen-Image-Edit", "qwen-image-edit"),
                        ("Qwen-Image-2512", "qwen-image-2512")):
        assert find_spec(name).name == entry
    t2i, edit = get_spec("qwen-image"), get_spec("qwen-image-edit-2511")
    assert (t2i.modality, t2i.tasks, t2i.guidance, t2i.spatial_stride) == ("image", {"t2i"}, "cfg_renorm", 16)
    assert edit.tasks == {"edit"} and edit.max_images == 3 and get_spec("qwen-image-edit").max_images == 1


def test_renorm_equals_the_pipelines_formula_on_packed_tokens():
    """Our unpacked (B, C, 1, H, W) renorm = diffusers' on packed (B, L, 64): norms per 2x2 token."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 1, 16, 1, 6, 10, generator=gen).unbind(0)
    got = combine_renorm(cond, uncond, 4.0)
    c, u = pack(cond, 2), pack(uncond, 2)                                    # (1, 15, 64)
    comb = u + 4.0 * (c - u)
    want = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.allclose(pack(got, 2), want, atol=1e-6)
    assert (got - combine(cond, uncond, 4.0)).abs().max() > 0.1
    assert combiner("cfg") is combine
    with pytest.raises(ValueError, match="unknown guidance mode 'x'"):
        combiner("x")


def test_edit_requests_take_up_to_the_models_images_and_size_follows_the_last():
    spec = get_spec("qwen-image-edit-2511")
    small, wide = image(40, 56), image(1280, 720)
    r = GenerationRequest(prompt="x", images=[small, wide]).resolve(spec)
    w, h = area_dimensions(REFERENCE_AREA, 1280 / 720)                      # diffusers' calculate_dimensions
    assert (r.height, r.width) == (h // 16 * 16, w // 16 * 16) == (768, 1376)
    assert r.image is small and r.images == (small, wide) and r.task == "edit" and r.num_frames == 1
    with pytest.raises(RequestError, match="images: at most 1 input image"):
        GenerationRequest(prompt="x", images=[small, wide]).resolve(get_spec("qwen-image-edit"))
    with pytest.raises(ValueError, match="not both"):
        GenerationRequest(prompt="x", image=small, images=[wide])
    with pytest.raises(RequestError, match="image: is required"):
        GenerationRequest(prompt="x").resolve(spec)
    with pytest.raises(RequestError, match="num_frames: is not accepted"):
        GenerationRequest(prompt="x", num_frames=5).resolve(get_spec("qwen-image"))
    assert GenerationRequest(prompt="x").resolve(get_spec("qwen-image")).output_type == "png"


def test_unsupported_pipelines_and_extra_components_are_refused(tiny_edit_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_edit_dir, folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "_class_name": "QwenImageLayeredPipeline"}))
    with pytest.raises(ValueError, match="pipeline 'QwenImageLayeredPipeline' is not supported"):
        resolve_checkpoint(str(folder))
    index_path.write_text(json.dumps({**index, "controlnet": ["diffusers", "QwenImageControlNetModel"]}))
    with pytest.raises(ValueError, match="unused: \\['controlnet'\\]"):
        resolve_checkpoint(str(folder))
    index_path.write_text(json.dumps(index))
    assert resolve_checkpoint(str(folder)).spec.name == "tiny-qwen-image-edit"


def test_the_dit_declares_its_seams_and_refuses_sequence_parallelism():
    from engine.dit import blocks_of, check_dit, skipped
    from engine.parallel.ulysses import UlyssesState, apply_ulysses

    cfg = QwenImageDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                             axes_dims_rope=(8, 12, 12))
    with torch.device("meta"):
        dit = QwenImageTransformer(cfg)
    check_dit(dit)
    assert len(blocks_of(dit)) == 2
    patterns = dit.quant_skip
    assert all(skipped(n, patterns) for n in ("img_in", "txt_in", "proj_out", "norm_out.linear",
                                              "time_text_embed.timestep_embedder.linear_1"))
    assert not skipped("transformer_blocks.0.img_mod.1", patterns)
    with pytest.raises(TypeError, match="no `sequence_attention` core"):
        apply_ulysses(dit, UlyssesState())


def test_config_refusals():
    with pytest.raises(ValueError, match="in_channels \\(60\\) must be out_channels"):
        QwenImageDiTConfig(in_channels=60)
    with pytest.raises(ValueError, match="use_layer3d_rope=True is not supported"):
        QwenImageDiTConfig(use_layer3d_rope=True)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        QwenImageDiTConfig(axes_dims_rope=(16, 56, 54))


def test_the_text_stage_gives_the_images_to_an_encoder_that_reads_them(tiny_edit_dir):
    from engine.options import EngineOptions
    from stages.text_encode import TextEncodeStage

    ckpt = resolve_checkpoint(tiny_edit_dir)
    stage = TextEncodeStage.from_checkpoint(ckpt, EngineOptions())
    assert stage.encoder.reads_images
    req = GenerationRequest(prompt="make it red", image=image(40, 56), seed=0).resolve(ckpt.spec)
    out = stage(req)
    other = stage(GenerationRequest(prompt="make it red", image=image(56, 40), seed=0).resolve(ckpt.spec))
    assert out.context.hidden.dim() == 2 and out.negative_context is not None
    assert out.context.hidden.shape != other.context.hidden.shape or \
        not torch.equal(out.context.hidden, other.context.hidden)  # the image conditions the prompt
    assert os.path.isdir(os.path.join(tiny_edit_dir, "processor"))


def test_int8_quantizes_the_blocks_and_a_prequantized_copy_loads_the_same(tmp_path):
    """INT8 linears in the blocks (modulation included), the embedders and the head kept; a
    `lightx2v quantize` copy of the checkpoint gives the load-time quantization's latents."""
    from engine.checkpoint import quantize_checkpoint
    from engine.options import EngineOptions
    from stages.pipeline import LocalPipeline

    def latents(model: str, quantization: str) -> tuple[torch.Tensor, torch.nn.Module]:
        pipe = LocalPipeline.from_checkpoint(resolve_checkpoint(model), EngineOptions(quantization=quantization))
        request = GenerationRequest(prompt="a fox", height=32, width=48, seed=1, steps=2, output_type="latent")
        return pipe.run(request).output.latents, pipe.denoise.transformer

    full, _ = latents("tiny-qwen-image", "none")
    int8, dit = latents("tiny-qwen-image", "int8")
    kinds = {name: type(m).__name__ for name, m in dit.named_modules()}
    assert kinds["transformer_blocks.0.img_mod.1"] != "Linear" and kinds["transformer_blocks.1.attn.to_q"] != "Linear"
    assert {kinds[n] for n in ("img_in", "txt_in", "proj_out", "norm_out.linear")} == {"Linear"}
    assert 0 < float((int8 - full).norm() / full.norm()) < 0.05
    # the pre-quantized copy (quantized from bf16 weights, as at load time in bf16): the same DiT
    from engine.families import get_family

    copy = quantize_checkpoint("tiny-qwen-image", str(tmp_path / "int8"), "int8")
    bf16 = EngineOptions(dtype="bfloat16", quantization="int8")
    at_load, pre = (get_family("qwen_image").load_dits(resolve_checkpoint(m), bf16)["transformer"].state_dict()
                    for m in ("tiny-qwen-image", copy))
    assert at_load.keys() == pre.keys() and any(k.endswith(".weight_q") for k in pre)
    assert all(torch.equal(at_load[k], pre[k]) for k in pre)

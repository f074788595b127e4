"""HunyuanVideo-1.5 family: registry entries and names, detection of both layouts (from configs
alone for the real releases), refusals naming the field, and the pieces of diffusers' pipelines it
reproduces outside the models (size buckets, system message, glyph text)."""
from __future__ import annotations

import inspect
import json
import os
import shutil

import pytest

from engine.checkpoint import find_spec, resolve_checkpoint
from engine.families import detect_spec
from engine.models.hunyuan_video15 import text_encoder, tiny
from engine.models.hunyuan_video15.adapter import bucket_size
from engine.registry import get_spec

diffusers = pytest.importorskip("diffusers")

REAL_DIT = {"_class_name": "HunyuanVideo15Transformer3DModel", "in_channels": 65, "out_channels": 32,
            "num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 54, "num_refiner_layers": 2,
            "target_size": 640, "task_type": "i2v", "use_meanflow": False}
"""diffusers' default config = the released DiT (480p); no weights are needed to detect a folder."""


def diffusers_folder(root, pipeline="HunyuanVideo15Pipeline", guider=None, **dit) -> str:
    """A diffusers-layout folder with the configs detection reads (no weights)."""
    os.makedirs(os.path.join(root, "transformer"))
    os.makedirs(os.path.join(root, "guider"))
    index = {k: v for k, v in tiny.MODEL_INDEX.items() if k not in ("image_encoder", "feature_extractor")}
    if pipeline == "HunyuanVideo15ImageToVideoPipeline":
        index = dict(tiny.MODEL_INDEX)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({**index, "_class_name": pipeline}, f)
    with open(os.path.join(root, "transformer", "config.json"), "w") as f:
        json.dump({**REAL_DIT, **dit}, f)
    with open(os.path.join(root, "guider", "guider_config.json"), "w") as f:
        json.dump({**tiny.GUIDER_CONFIG, **(guider or {})}, f)
    return str(root)


@pytest.mark.parametrize("pipeline,dit,guider,name", [
    ("HunyuanVideo15Pipeline", {}, {}, "hunyuanvideo-1.5-480p-t2v"),
    ("HunyuanVideo15ImageToVideoPipeline", {}, {}, "hunyuanvideo-1.5-480p-i2v"),
    ("HunyuanVideo15Pipeline", {"target_size": 960, "task_type": "t2v"}, {}, "hunyuanvideo-1.5-720p-t2v"),
    ("HunyuanVideo15ImageToVideoPipeline", {"target_size": 960}, {}, "hunyuanvideo-1.5-720p-i2v"),
    ("HunyuanVideo15Pipeline", {}, {"guidance_scale": 1.0}, "hunyuanvideo-1.5-480p-t2v-cfg-distilled"),
    ("HunyuanVideo15ImageToVideoPipeline", {"target_size": 960}, {"guidance_scale": 1.0},
     "hunyuanvideo-1.5-720p-i2v-cfg-distilled"),
    ("HunyuanVideo15ImageToVideoPipeline", {"use_meanflow": True}, {"guidance_scale": 1.0},
     "hunyuanvideo-1.5-480p-i2v-step-distilled"),
])
def test_released_diffusers_folders_are_recognised(tmp_path, pipeline, dit, guider, name):
    spec = detect_spec(diffusers_folder(tmp_path / "ckpt", pipeline, guider, **dit), "diffusers")
    assert spec.name == name
    assert spec.defaults.guidance_scale == guider.get("guidance_scale", 6.0)   # the folder's guider


def test_diffusers_folder_refusals(tmp_path):
    with pytest.raises(ValueError, match="guidance_rescale=0.7 is not supported"):
        detect_spec(diffusers_folder(tmp_path / "a", guider={"guidance_rescale": 0.7}), "diffusers")
    path = diffusers_folder(tmp_path / "b")
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({**index, "image_encoder": ["transformers", "SiglipVisionModel"]}, f)
    with pytest.raises(ValueError, match=r"does not use: \['image_encoder'\]"):
        detect_spec(path, "diffusers")
    with pytest.raises(ValueError, match="does not fit the checkpoint"):
        detect_spec(diffusers_folder(tmp_path / "c"), "diffusers", spec_name="hunyuanvideo-1.5-720p-i2v")


def test_names_and_defaults():
    assert find_spec("HunyuanVideo-1.5").name == "hunyuanvideo-1.5-480p-t2v"
    assert find_spec("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_i2v").name == "hunyuanvideo-1.5-720p-i2v"
    assert find_spec("tencent/HunyuanVideo-1.5").name == "hunyuanvideo-1.5-480p-t2v"
    assert find_spec("hunyuanvideo-1.5-480p_i2v_step_distilled").name == "hunyuanvideo-1.5-480p-i2v-step-distilled"
    shifts = {"480p-t2v": 5.0, "480p-i2v": 5.0, "720p-t2v": 9.0, "720p-i2v": 7.0, "480p-t2v-cfg-distilled": 5.0,
              "480p-i2v-cfg-distilled": 5.0, "720p-i2v-cfg-distilled": 7.0, "480p-i2v-step-distilled": 7.0}
    for name, shift in shifts.items():
        spec = get_spec(f"hunyuanvideo-1.5-{name}")
        d = spec.defaults
        assert (d.shift, d.num_frames, d.fps, d.sampler, d.spacing) == (shift, 121, 24, "euler", "linear_to_zero")
        distilled = "distilled" in name
        assert (spec.guidance, d.guidance_scale) == (("none", 1.0) if distilled else ("cfg", 6.0)), name
        assert d.steps == (12 if "step" in name else 50)
        assert (d.height, d.width) == ((720, 1280) if name.startswith("720p") else (480, 848))
        assert spec.latent.channels == 32 and spec.spatial_stride == 16 and spec.temporal_stride == 4
    assert get_spec("tiny-hunyuanvideo-1.5").tasks == frozenset({"t2v", "i2v"})


def test_size_buckets_are_diffusers():
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for target in (640, 960, 64):
        for h, w in [(9, 16), (16, 9), (1, 1), (720, 1280), (1080, 1920), (1920, 1080), (40, 56), (333, 1000),
                     (1000, 251), (512, 512), (600, 800), (3, 13)]:
            assert bucket_size(h, w, target) == processor.calculate_default_height_width(h, w, target), (h, w, target)


def test_prompt_handling_is_diffusers():
    from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5 as dp

    signature = inspect.signature(dp.HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    assert signature["system_message"].default == text_encoder.SYSTEM_MESSAGE
    assert signature["crop_start"].default == text_encoder.CROP_START
    assert signature["num_hidden_layers_to_skip"].default == text_encoder.SKIPPED_LAYERS
    assert signature["tokenizer_max_length"].default == text_encoder.MLLM_MAX_TOKENS
    for prompt in ['a "RED" sign', 'say “hi” and "HI" and “hi”', 'no quotes', '"A" "B" "A"', 'only ""', '"A"',
                   'mixed "x” quotes', "", '"  spaced  "']:
        assert text_encoder.glyph_text(prompt) == dp.extract_glyph_texts(prompt), prompt
    assert text_encoder.chat("")[1]["content"] == " "   # an empty prompt is a space, as diffusers


def test_official_layout_picks_its_dit_folder(tmp_path, caplog):
    src = tiny.write_tiny(str(tmp_path / "diffusers"))
    official = tiny.write_official_layout(src, str(tmp_path / "official"))
    # a second DiT folder of the release's name (the tiny weights again)
    dits = os.path.join(official, "transformer")
    shutil.copytree(os.path.join(dits, "480p_i2v"), os.path.join(dits, "720p_t2v"))
    with caplog.at_level("INFO"):
        ckpt = resolve_checkpoint(official)
    assert ckpt.layout == "official" and ckpt.spec.name == "tiny-hunyuanvideo-1.5"
    assert "using 480p_i2v" in caplog.text
    assert ckpt.spec.defaults.shift == 5.0          # the registry's: the official layout has no say
    with pytest.raises(ValueError, match="expects Arch"):
        resolve_checkpoint(official, spec_name="hunyuanvideo-1.5-720p-t2v")
    with pytest.raises(ValueError, match=r"480p_t2v is not there"):
        resolve_checkpoint(official, spec_name="hunyuanvideo-1.5-480p-t2v")


@pytest.mark.parametrize("saved_as", ["SiglipImageProcessor", "SiglipImageProcessorFast"])
def test_image_processor_under_either_class_name(tmp_path, saved_as):
    """A feature_extractor/ saved by a transformers with a fast (torchvision) SigLIP processor names
    that class; the settings are the same and load to the same processor here."""
    import numpy as np
    from PIL import Image

    from engine.models.hunyuan_video15.loader import make_siglip_processor

    folder = tmp_path / "feature_extractor"
    tiny.siglip_processor().save_pretrained(folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "image_processor_type": saved_as}))
    image = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    got = make_siglip_processor(str(folder))(images=[image], return_tensors="pt").pixel_values
    want = tiny.siglip_processor()(images=[image], return_tensors="pt").pixel_values
    assert got.shape == (1, 3, 56, 56) and bool((got == want).all())
    wrong = {**settings, "image_processor_type": "CLIPImageProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="not a SigLIP image processor"):
        make_siglip_processor(str(folder))


def test_siglip_without_its_pooling_head_loads_to_the_same_tokens(tmp_path):
    """The tokens are the last hidden state; a checkpoint without the (unused) head loads too."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from engine.families import get_family
    from engine.options import EngineOptions

    ckpt = resolve_checkpoint(tiny.write_tiny(str(tmp_path / "ckpt")))
    options = EngineOptions(device="cpu", dtype="float32")
    image = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    with_head = get_family(ckpt.spec.family).load_image_encoder(ckpt, options).encode([image])
    weights = os.path.join(ckpt.path, "image_encoder", "model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith(("head.", "vision_model.head."))},
              weights)
    without = get_family(ckpt.spec.family).load_image_encoder(ckpt, options).encode([image])
    assert with_head.shape == (1, 16, 32) and torch.equal(with_head, without)


def test_official_folder_without_its_encoders_says_where_they_come_from(tmp_path):
    from engine.families import get_family
    from engine.options import EngineOptions

    official = tiny.write_official_layout(tiny.write_tiny(str(tmp_path / "d")), str(tmp_path / "o"))
    shutil.rmtree(os.path.join(official, "text_encoder", "llm"))
    ckpt = resolve_checkpoint(official)
    with pytest.raises(FileNotFoundError, match="lacks .*text_encoder/llm.*Qwen/Qwen2.5-VL-7B-Instruct"):
        get_family(ckpt.spec.family).load_text_encoder(ckpt, EngineOptions(device="cpu"))

"""Model registry entries, families and the generated tiny-wan checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.families import get_family, list_families
from engine.models.wan import specs as wan_specs
from engine.models.wan import tiny
from engine.registry import get_spec, list_specs

WAN_NAMES = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "tiny-wan")


def test_wan_entries_are_registered_with_their_tasks():
    names = {s.name for s in list_specs()}
    assert set(WAN_NAMES) <= names
    assert get_spec("wan2.1-t2v-14b").tasks == frozenset({"t2v"})
    assert get_spec("wan2.1-i2v-14b-480p").tasks == frozenset({"i2v"})
    assert get_spec("tiny-wan").tasks == frozenset({"t2v", "i2v"})
    for name in WAN_NAMES:
        assert get_spec(name).family == "wan"


def test_wan_defaults_follow_the_release():
    t2v = get_spec("wan2.1-t2v-14b").defaults
    assert (t2v.num_frames, t2v.fps, t2v.steps, t2v.guidance_scale, t2v.shift) == (81, 16, 50, 5.0, 5.0)
    i2v480 = get_spec("wan2.1-i2v-14b-480p").defaults
    assert (i2v480.height, i2v480.width, i2v480.steps, i2v480.shift) == (480, 832, 40, 3.0)
    i2v720 = get_spec("wan2.1-i2v-14b-720p").defaults
    assert (i2v720.height, i2v720.width, i2v720.shift) == (720, 1280, 5.0)
    assert get_spec("wan2.1-t2v-1.3b").defaults.negative_prompt.startswith("色调艳丽")


@pytest.mark.parametrize("name", WAN_NAMES)
def test_defaults_satisfy_the_stride_rules(name):
    spec = get_spec(name)
    d = spec.defaults
    assert d.height % spec.spatial_stride == 0 and d.width % spec.spatial_stride == 0
    assert (d.num_frames - 1) % spec.temporal_stride == 0


def test_tiny_defaults_are_small():
    d = get_spec("tiny-wan").defaults
    assert (d.num_frames, d.height, d.width, d.steps, d.fps) == (9, 64, 64, 4, 8)


def test_unknown_names_give_clear_errors():
    with pytest.raises(KeyError, match="known models: .*tiny-wan"):
        get_spec("wan9-nope")
    with pytest.raises(KeyError, match="known families: .*wan"):
        get_family("nope")


def test_family_registry():
    assert "wan" in list_families()
    fam = get_family("wan")
    for method in ("detect_spec", "load_text_encoder", "load_image_encoder", "load_dits", "load_vae"):
        assert callable(getattr(fam, method))


def test_tiny_arch_matches_the_generator():
    assert wan_specs.WanArch.of(tiny.dit_config()) == wan_specs.TINY_ARCH
    # every registered Wan variant is told apart by its shape (architecture, experts, per-token
    # timesteps), except Wan2.1 I2V 480p/720p, and the step-distilled entries (fixed timesteps),
    # which share their base's shape and are picked by name
    variants = [variant for spec, variant in wan_specs.SPECS if spec.defaults.timesteps is None]
    assert len(set(variants)) == len(variants) - 1


# --------------------------------------------------------------------------- tiny-wan files


def _tree(directory: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


def test_tiny_wan_is_deterministic_and_small(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny.write_tiny_wan(a)
    tiny.write_tiny_wan(b)
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys()
    weights = [k for k in ta if k.endswith(".safetensors")]
    assert len(weights) == 4
    for k in weights:
        assert ta[k] == tb[k], k
    assert sum(len(v) for v in ta.values()) < 5 * 2**20
    for required in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                     "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
                     "image_encoder/config.json", "image_processor/preprocessor_config.json"):
        assert required in ta, required


def test_tiny_weights_are_not_degenerate(tiny_wan_dir):
    from safetensors.torch import load_file

    sd = load_file(os.path.join(tiny_wan_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    for key, value in sd.items():
        assert torch.isfinite(value).all(), key
        assert value.std() > 0 or value.numel() == 1, key


def test_tiny_tokenizer_reloads_with_autotokenizer(tiny_wan_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_wan_dir, "tokenizer"))
    ids = tok(["a cat walks on the beach"], padding="max_length", max_length=16).input_ids[0]
    assert ids[:7] == tok.convert_tokens_to_ids(["▁a", "▁cat", "▁walks", "▁on", "▁the", "▁beach", "</s>"])
    assert ids[7:] == [tok.pad_token_id] * 9 and tok.pad_token_id == 0


def test_tiny_configs_are_readable_by_diffusers(tiny_wan_dir):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    config = WanTransformer3DModel.load_config(os.path.join(tiny_wan_dir, "transformer"))
    assert WanTransformer3DModel.from_config(config).config.in_channels == 36
    vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(os.path.join(tiny_wan_dir, "vae")))
    assert vae.config.z_dim == 16
    sched = UniPCMultistepScheduler.from_pretrained(os.path.join(tiny_wan_dir, "scheduler"))
    assert sched.config.use_flow_sigmas and sched.config.prediction_type == "flow_prediction"
    with open(os.path.join(tiny_wan_dir, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "WanImageToVideoPipeline"


def test_diffusers_pipeline_opens_tiny_wan(tiny_wan_dir):
    import importlib.util

    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from safetensors.torch import load_file

    kwargs = {}
    if importlib.util.find_spec("accelerate") is None:
        # diffusers reads its Wan DiT/VAE files only with accelerate installed: build those two
        # from their folders by hand, let from_pretrained load everything else
        for name, cls in (("transformer", WanTransformer3DModel), ("vae", AutoencoderKLWan)):
            sub = os.path.join(tiny_wan_dir, name)
            model = cls.from_config(cls.load_config(sub))
            model.load_state_dict(load_file(os.path.join(sub, "diffusion_pytorch_model.safetensors")), strict=True)
            kwargs[name] = model
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_wan_dir, **kwargs)
    assert pipe.transformer.config.image_dim == 32
    assert pipe.text_encoder.config.d_model == 32
    assert pipe.image_encoder.config.image_size == 224
    assert pipe.image_processor.crop_size == {"height": 224, "width": 224}
    assert pipe.scheduler.config.use_flow_sigmas


def test_materialize_is_cached_and_replaces_stale_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTX2V_CACHE", str(tmp_path))
    path = tiny.materialize_tiny_wan()
    assert path == str(tmp_path / tiny.VERSION)
    stamp = os.path.getmtime(os.path.join(path, tiny.MARKER))
    assert tiny.materialize_tiny_wan() == path
    assert os.path.getmtime(os.path.join(path, tiny.MARKER)) == stamp  # not rewritten
    # a folder from an older generator is replaced, and no temporary folders stay behind
    with open(os.path.join(path, tiny.MARKER), "w") as f:
        json.dump({"fingerprint": "old"}, f)
    assert tiny.materialize_tiny_wan() == path
    with open(os.path.join(path, tiny.MARKER)) as f:
        assert json.load(f)["fingerprint"] == tiny.fingerprint()
    assert os.listdir(tmp_path) == [tiny.VERSION]

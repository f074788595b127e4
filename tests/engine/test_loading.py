"""Checkpoint loading: weights files, meta build, layouts, variant detection, Wan loaders."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.families import get_family
from engine.checkpoint import detect_layout, resolve_checkpoint
from engine.loading import build_module, read_pth, read_safetensors, safetensors_files
from engine.models.wan import tiny
from engine.models.wan.specs import TINY_ARCH, WanArch
from engine.options import EngineOptions
from engine.registry import get_spec

torch.set_num_threads(1)
OPTS = EngineOptions()
WAN = get_family("wan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------- weights files


def test_sharded_and_single_safetensors_read_the_same(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(3, 4, generator=gen) for i in range(5)}
    single, sharded, globbed = tmp_path / "single", tmp_path / "sharded", tmp_path / "glob"
    for d in (single, sharded, globbed):
        d.mkdir()
    save_file(sd, str(single / "diffusion_pytorch_model.safetensors"))
    weight_map = {}
    for i, keys in enumerate([["layer0.weight", "layer1.weight"], ["layer2.weight", "layer3.weight", "layer4.weight"]]):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in keys}, str(sharded / name))
        save_file({k: sd[k] for k in keys}, str(globbed / name))
        weight_map.update({k: name for k in keys})
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for d in (single, sharded, globbed):
        got = read_safetensors(str(d))
        assert got.keys() == sd.keys()
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert len(safetensors_files(str(sharded))) == 2
    assert read_safetensors(str(single / "diffusion_pytorch_model.safetensors")).keys() == sd.keys()


def test_missing_weights_name_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json.*model\.safetensors"):
        read_safetensors(str(tmp_path), stem="model")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        read_safetensors(str(tmp_path), stem="model")


def test_read_pth_is_weights_only(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"a": torch.arange(4.0)}, path)
    assert torch.equal(read_pth(path)["a"], torch.arange(4.0))

    import argparse

    torch.save({"a": argparse.Namespace(x=1)}, str(tmp_path / "bad.pth"))  # arbitrary object
    with pytest.raises(Exception, match="(?i)weights.only"):
        read_pth(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError):
        read_pth(str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------- meta build


class Toy(nn.Module):
    keep_in_fp32 = ("norm",)

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.register_buffer("scale", torch.ones(4))
        self.inits = getattr(Toy, "inits", 0)
        Toy.inits = self.inits + 1


def test_build_module_assigns_casts_and_keeps_buffers():
    ref = Toy()
    sd = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    expected = {k: v.clone() for k, v in sd.items()}
    m = build_module(Toy, sd, dtype=torch.bfloat16, keep_in_fp32=Toy.keep_in_fp32)
    assert m.proj.weight.dtype == torch.bfloat16 and m.scale.dtype == torch.bfloat16
    assert m.norm.weight.dtype == torch.float32
    assert torch.equal(m.norm.weight, expected["norm.weight"])
    assert torch.equal(m.proj.weight, expected["proj.weight"].bfloat16())
    assert torch.equal(m.table, torch.arange(4.0))  # non-persistent buffer computed in __init__
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert all(p.device.type == "cpu" for p in m.parameters())


def test_build_module_is_strict():
    sd = {k: torch.zeros_like(v) for k, v in Toy().state_dict().items()}
    missing = dict(sd)
    missing.pop("proj.bias")
    with pytest.raises(RuntimeError, match=r"(?s)does not fit Toy.*proj\.bias"):
        build_module(Toy, missing)
    extra = dict(sd, **{"other.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="other.weight"):
        build_module(Toy, extra)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(5, 3)
        self.b = nn.Embedding(5, 3)
        self.norm = nn.Embedding(5, 3)


def test_build_module_reads_lazy_tensors_once_and_keeps_ties(tmp_path):
    from engine.loading import LazyTensor, lazy_safetensors

    weight = torch.randn(5, 3)
    save_file({"a.weight": weight}, str(tmp_path / "model.safetensors"))
    lazy = lazy_safetensors(str(tmp_path), stem="model")
    assert isinstance(lazy["a.weight"], LazyTensor) and lazy["a.weight"].shape == (5, 3)
    sd = {"a.weight": lazy["a.weight"], "b.weight": lazy["a.weight"], "norm.weight": lazy["a.weight"]}
    m = build_module(Tied, sd, dtype=torch.bfloat16, keep_in_fp32=("norm",))
    assert m.a.weight.data_ptr() == m.b.weight.data_ptr()  # one tensor under two names
    assert m.a.weight.dtype == torch.bfloat16 and m.norm.weight.dtype == torch.float32
    assert torch.equal(m.norm.weight, weight) and torch.equal(m.a.weight, weight.bfloat16())


def test_params_on_meta_does_not_initialise():
    from engine.loading import params_on_meta

    with params_on_meta():
        m = nn.Linear(1024, 1024)
    assert m.weight.device.type == "meta"
    lin = nn.Linear(2, 2)  # outside: normal again
    assert lin.weight.device.type == "cpu"


def test_params_on_meta_leaves_other_threads_alone():
    """A module built on another thread while a checkpoint loads keeps real parameters."""
    import threading

    from engine.loading import params_on_meta

    inside, built = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def loader() -> None:
        with params_on_meta():
            inside.set()
            built.wait(10)
            seen["loader"] = nn.Linear(4, 4).weight.device.type

    thread = threading.Thread(target=loader)
    thread.start()
    assert inside.wait(10)
    seen["other"] = nn.Linear(4, 4).weight.device.type  # while the loader is inside
    built.set()
    thread.join(10)
    assert seen == {"loader": "meta", "other": "cpu"}
    assert nn.Module.register_parameter.__qualname__ == "Module.register_parameter"  # unpatched


# --------------------------------------------------------------------------- layouts and variants


def test_bad_directory_lists_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"model_index\.json.*config\.json.*diffusion_pytorch_model\*\.safetensors.*readme\.txt"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        detect_layout(str(tmp_path / "nope"))


def test_unknown_names_and_weightless_entries_are_clear_errors():
    with pytest.raises(ValueError, match=r"neither a registered model name or alias \(.*tiny-wan.*\) nor a local directory"):
        resolve_checkpoint("no-such-model")
    with pytest.raises(ValueError, match="has no local weights.*pass the checkpoint directory"):
        resolve_checkpoint("wan2.1-t2v-14b")


def _diffusers_config_dir(root, name: str, **config) -> str:
    """A diffusers-layout folder holding only configs (variant detection reads no weights)."""
    path = root / name
    (path / "transformer").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (path / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "WanTransformer3DModel", "attention_head_dim": 128, "out_channels": 16, **config}))
    return str(path)


T2V_13B = dict(num_attention_heads=12, num_layers=30, ffn_dim=8960, in_channels=16)
T2V_14B = dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=16)
I2V_14B = dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=36, image_dim=1280,
               added_kv_proj_dim=5120)


def test_variant_is_detected_from_the_config_not_the_name(tmp_path):
    assert resolve_checkpoint(_diffusers_config_dir(tmp_path, "Wan-14B-misnamed", **T2V_13B)).spec.name == "wan2.1-t2v-1.3b"
    assert resolve_checkpoint(_diffusers_config_dir(tmp_path, "a", **T2V_14B)).spec.name == "wan2.1-t2v-14b"
    i2v = _diffusers_config_dir(tmp_path, "Wan2.1-I2V-14B-720P", **I2V_14B)
    ckpt = resolve_checkpoint(i2v)
    assert ckpt.spec.name == "wan2.1-i2v-14b-480p" and ckpt.layout == "diffusers"  # 480p by default
    assert resolve_checkpoint(i2v, spec_name="wan2.1-i2v-14b-720p").spec.name == "wan2.1-i2v-14b-720p"
    with pytest.raises(ValueError, match="does not fit.*wan2.1-i2v-14b-480p"):
        resolve_checkpoint(i2v, spec_name="wan2.1-t2v-14b")


def test_unmatched_config_gets_a_derived_spec(tmp_path, caplog):
    path = _diffusers_config_dir(tmp_path, "odd", num_attention_heads=4, num_layers=3, ffn_dim=64, in_channels=16)
    with caplog.at_level(logging.WARNING):
        spec = resolve_checkpoint(path).spec
    assert spec.family == "wan" and spec.tasks == frozenset({"t2v"})
    assert spec.defaults == get_spec("wan2.1-t2v-1.3b").defaults
    assert "matches no registered Wan variant" in caplog.text


def test_official_variant_detection_reads_the_weights_shapes(tmp_path):
    """The official config has no text/image widths: they come from the safetensors headers."""
    path = tmp_path / "Wan2.1-T2V-1.3B-renamed"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
        "in_dim": 36, "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16, "text_len": 512}))
    save_file({"text_embedding.0.weight": torch.zeros(1, 4096), "time_embedding.0.weight": torch.zeros(1, 256),
               "img_emb.proj.0.weight": torch.zeros(1280)},
              str(path / "diffusion_pytorch_model.safetensors"))
    ckpt = resolve_checkpoint(str(path))
    assert (ckpt.layout, ckpt.spec.name) == ("official", "wan2.1-i2v-14b-480p")


# --------------------------------------------------------------------------- tiny-wan in both layouts


@pytest.fixture(scope="module")
def official_dir(tiny_wan_dir, tmp_path_factory):
    return tiny.write_official_layout(tiny_wan_dir, str(tmp_path_factory.mktemp("official") / "Wan-tiny"))


def test_tiny_resolves_by_name_and_by_folder(tiny_wan_dir):
    by_name = resolve_checkpoint("tiny-wan")
    assert by_name.layout == "diffusers" and by_name.spec is get_spec("tiny-wan")
    by_dir = resolve_checkpoint(tiny_wan_dir)
    assert by_dir.spec is get_spec("tiny-wan") and by_dir.layout == "diffusers"


def test_official_layout_files(official_dir):
    names = set(os.listdir(official_dir))
    assert {"config.json", "diffusion_pytorch_model.safetensors.index.json", "Wan2.1_VAE.pth",
            "models_t5_umt5-xxl-enc-bf16.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
            "google"} <= names
    assert len([n for n in names if n.startswith("diffusion_pytorch_model-")]) == 2
    config = json.load(open(os.path.join(official_dir, "config.json")))
    assert "text_dim" not in config and config["model_type"] == "i2v"
    ckpt = resolve_checkpoint(official_dir)
    assert (ckpt.layout, ckpt.spec.name) == ("official", "tiny-wan")


@pytest.fixture(scope="module")
def both(tiny_wan_dir, official_dir):
    return resolve_checkpoint(tiny_wan_dir), resolve_checkpoint(official_dir)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 36, 3, 8, 8, generator=gen)
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, 512, 32, generator=gen)
    image_context = torch.randn(2, 257, 32, generator=gen)
    return x, t, context, image_context


def test_transformer_same_in_both_layouts(both):
    a, b = (WAN.load_dits(c, OPTS)["transformer"] for c in both)
    x, t, ctx, img = _inputs()
    out_a, out_b = a(x, t, ctx, img), b(x, t, ctx, img)
    assert out_a.shape == (2, 16, 3, 8, 8)
    assert torch.equal(out_a, out_b)
    assert out_a.std() > 0.1  # not degenerate


def test_vae_same_in_both_layouts(both):
    a, b = (WAN.load_vae(c, OPTS) for c in both)
    assert a.config == b.config
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.decode(z), b.decode(z))
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(a.encode(video), b.encode(video))


def test_text_encoder_same_in_both_layouts(both):
    a, b = (WAN.load_text_encoder(c, OPTS) for c in both)
    prompts = ["a cat walks on the beach", "slow motion, a red car"]
    assert torch.equal(a.encode(prompts), b.encode(prompts))


def test_image_encoder_same_in_both_layouts(both):
    from PIL import Image

    a, b = (WAN.load_image_encoder(c, OPTS) for c in both)
    img = Image.new("RGB", (96, 64), (200, 30, 90))
    ea, eb = a.encode([img]), b.encode([img])
    assert ea.shape == (1, 257, 32)
    assert torch.equal(ea, eb)


def test_bfloat16_keeps_the_fp32_modules(both):
    from engine.models.wan.transformer import WanTransformer

    model = WAN.load_dits(both[0], EngineOptions(dtype="bfloat16"))["transformer"]
    for name, p in model.named_parameters():
        expected = torch.float32 if WanTransformer.keeps_fp32(name) else torch.bfloat16
        assert p.dtype == expected, name
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    x, t, ctx, img = _inputs()
    ref = WAN.load_dits(both[0], OPTS)["transformer"](x, t, ctx, img)
    assert rel_err(model(x.bfloat16(), t, ctx.bfloat16(), img.bfloat16()), ref) < 0.05


def test_bfloat16_fp32_modules_by_name(both):
    """The keep-in-fp32 rule spelled out (diffusers' `_keep_in_fp32_modules`), not recomputed."""
    model = WAN.load_dits(both[0], EngineOptions(dtype="bfloat16"))["transformer"]
    params = dict(model.named_parameters())
    for name in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight",
                 "condition_embedder.image_embedder.norm1.weight"):
        assert params[name].dtype == torch.float32, name
    for name in ("condition_embedder.time_proj.weight", "blocks.0.attn1.norm_q.weight",
                 "blocks.0.ffn.net.0.proj.weight", "proj_out.weight", "patch_embedding.weight"):
        assert params[name].dtype == torch.bfloat16, name


def test_bad_attention_backend_is_refused_before_reading_weights(both, monkeypatch):
    from engine.models.wan import loader

    def no_build(*args, **kwargs):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(loader, "build_module", no_build)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; known backends: .*sdpa"):
        WAN.load_dits(both[0], EngineOptions(attention="nope"))["transformer"]
    with pytest.raises(ValueError, match="'sage_int8' cannot run on device 'cpu'"):
        WAN.load_dits(both[0], EngineOptions(attention="sage_int8"))["transformer"]
    # a backend whose kernels cannot take the model's head size (tiny-wan: 16)
    from engine.attention import AttentionBackend, register_backend, sdpa_attention, unregister_backend

    register_backend(AttentionBackend("test_dims64", sdpa_attention, head_dims=(64, 128)))
    try:
        with pytest.raises(ValueError, match="'test_dims64' does not support head dim 16 .supported: 64, 128"):
            WAN.load_dits(both[0], EngineOptions(attention="test_dims64"))["transformer"]
    finally:
        unregister_backend("test_dims64")


def test_text_encoder_file_with_both_tied_embeddings_loads_one_copy(tiny_wan_dir, tmp_path):
    """Some exports store `shared.weight` and `encoder.embed_tokens.weight` separately: the model
    must still hold the (huge) embedding once, tied as transformers ties it."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_wan_dir, path)
    te_file = os.path.join(path, "text_encoder", "model.safetensors")
    sd = load_file(te_file)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    save_file(sd, te_file, metadata={"format": "pt"})
    model = WAN.load_text_encoder(resolve_checkpoint(path), OPTS).model
    assert model.shared.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()


def test_image_encoder_refused_for_t2v_models(both):
    import dataclasses

    t2v = dataclasses.replace(both[0], spec=get_spec("wan2.1-t2v-1.3b"))
    with pytest.raises(ValueError, match="no image encoder"):
        WAN.load_image_encoder(t2v, OPTS)


# --------------------------------------------------------------------------- diffusers' own files


@pytest.fixture(scope="module")
def diffusers_saved(tiny_wan_dir, tmp_path_factory):
    """A whole diffusers-layout folder written by `WanImageToVideoPipeline.save_pretrained`, with
    a DiT and VAE initialised by diffusers itself (the encoders are the tiny ones)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    from engine.models.wan.image_encoder import clip_image_processor_cls

    sub = lambda name: os.path.join(tiny_wan_dir, name)  # noqa: E731
    torch.manual_seed(123)
    dit = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(sub("transformer"))).eval()
    vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(sub("vae"))).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(sub("tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(sub("text_encoder")).eval(),
        vae=vae, transformer=dit,
        scheduler=UniPCMultistepScheduler.from_pretrained(sub("scheduler")),
        image_processor=clip_image_processor_cls().from_pretrained(sub("image_processor")),
        image_encoder=CLIPVisionModel.from_pretrained(sub("image_encoder")).eval(),
    )
    root = str(tmp_path_factory.mktemp("diffusers_saved") / "ckpt")
    pipe.save_pretrained(root)
    return root, pipe


def test_diffusers_saved_transformer_loads_without_conversion(diffusers_saved):
    path, pipe = diffusers_saved
    ref = pipe.transformer
    ckpt = resolve_checkpoint(path)
    assert ckpt.spec.name == "tiny-wan"
    ours = WAN.load_dits(ckpt, OPTS)["transformer"]
    saved = load_file(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"))
    assert set(ours.state_dict()) == set(saved)
    x, t, ctx, img = _inputs(3)
    with torch.no_grad():
        expected = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    assert rel_err(ours(x, t, ctx, img), expected) < 1e-5


def test_diffusers_saved_vae_loads_without_conversion(diffusers_saved):
    path, pipe = diffusers_saved
    ref = pipe.vae
    ours = WAN.load_vae(resolve_checkpoint(path), OPTS)
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    mean = torch.tensor(ours.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ours.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = ref.decode(z * std + mean).sample
    assert rel_err(ours.decode(z), expected) < 1e-4


def test_diffusers_saved_encoders_load(diffusers_saved):
    from PIL import Image

    path, pipe = diffusers_saved
    ckpt = resolve_checkpoint(path)
    prompts = ["a cat walks on the beach", ""]
    with torch.no_grad():
        text_ref = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=512, device=torch.device("cpu"))
    assert rel_err(WAN.load_text_encoder(ckpt, OPTS).encode(prompts), text_ref) < 1e-5
    img = Image.new("RGB", (50, 80), (10, 200, 40))
    with torch.no_grad():
        image_ref = pipe.encode_image([img], device=torch.device("cpu"))
    assert rel_err(WAN.load_image_encoder(ckpt, OPTS).encode([img]), image_ref) < 1e-5


def test_arch_of_loaded_dit_matches_spec(both):
    model = WAN.load_dits(both[1], OPTS)["transformer"]
    assert WanArch.of(model.config) == TINY_ARCH


def test_vae_config_is_inferred_from_the_weights_shapes():
    """The official Wan2.1_VAE.pth has no config: the released architecture is read back from
    the tensor shapes (checked on meta tensors of the full-size default VAE)."""
    from engine.models.wan.loader import infer_vae_config
    from engine.models.wan.vae import WanVAE, WanVAEConfig

    for config in (WanVAEConfig(), WanVAEConfig(**tiny.TINY_VAE),
                   WanVAEConfig(base_dim=8, dim_mult=(1, 2, 3, 3), temperal_downsample=(True, False, True))):
        with torch.device("meta"):
            sd = WanVAE(config).state_dict()
        assert infer_vae_config(sd) == config

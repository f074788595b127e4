"""The built-in tiny random-weight HunyuanVideo-1.5 checkpoint (`tiny-hunyuanvideo-1.5`), and the
same weights in the official release layout (for tests).

A tiny instance of every real component, so the whole system runs anywhere, in seconds, on a CPU
(its videos are noise): the DiT (4 heads of 16, 2 dual-stream blocks, 2 refiner blocks), the VAE
(32 latent channels, 16x / 4x compression, narrow), a 4-layer Qwen2.5-VL text model with a byte
tokenizer and the real chat-template layout, a 2-layer ByT5 encoder with glyph tokens, a 2-layer
SigLIP tower (56 px, 16 tokens). Size buckets about 64 x 64 px (`target_size` 64).

The Qwen tokenizer: byte-level, no merges, plus added tokens that make the chat template's text
before the prompt exactly `CROP_START` (108) tokens, as with the real Qwen2.5-VL tokenizer, so the
template crop of the real pipeline lands on the first prompt token here too.

Weights: fan-in-scaled normal (`randomize_`), norm scales about 1, embeddings about N(0, 1); the
DiT's q/k norms multiplied by `qk_gain` (sharper attention, so which tokens are attended shows in
the output: the parity tests use it). Written once into `$LIGHTX2V_CACHE/tiny-hunyuanvideo-1.5-v1`
(a fingerprint of the generator and the module layouts marks it; a stale folder is regenerated).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from torch import nn

from engine.tiny import MARKER, materialize, randomize_, save_diffusers_module

NAME = "tiny-hunyuanvideo-1.5"
VERSION = f"{NAME}-v1"
SEED = 0

TINY_DIT = dict(
    in_channels=65, out_channels=32, num_attention_heads=4, attention_head_dim=16, num_layers=2,
    num_refiner_layers=2, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=32, rope_axes_dim=(4, 6, 6),
    target_size=64, task_type="i2v",
)
TINY_VAE = dict(latent_channels=32, block_out_channels=(32, 32, 64, 64, 64), layers_per_block=1)
TINY_QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                 max_position_embeddings=2048, rms_norm_eps=1e-6)
TINY_BYT5 = dict(d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
                 dropout_rate=0.0, relative_attention_num_buckets=32, relative_attention_max_distance=128)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=56, patch_size=14)
GLYPH_COLORS = {"white": 0, "black": 1, "red": 2}
GLYPH_FONTS = {"en-Arial": 0, "zh-SimSun": 1}
"""The Glyph-SDXL-v2 assets (color_idx.json, multilingual_10-lang_idx.json), shortened."""

SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
                    "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 5.0, "shift_terminal": None,
                    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                    "use_dynamic_shifting": False, "use_exponential_sigmas": False, "use_karras_sigmas": False}
GUIDER_CONFIG = {"_class_name": "ClassifierFreeGuidance", "_diffusers_version": "0.42.1", "enabled": True,
                 "guidance_rescale": 0.0, "guidance_scale": 6.0, "start": 0.0, "stop": 1.0,
                 "use_original_formulation": False}
MODEL_INDEX = {
    "_class_name": "HunyuanVideo15ImageToVideoPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": ["transformers", "SiglipImageProcessor"],
    "guider": ["diffusers", "ClassifierFreeGuidance"],
    "image_encoder": ["transformers", "SiglipVisionModel"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "tokenizer_2": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "HunyuanVideo15Transformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo15"],
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2.5-VL's chat template for text-only conversations that start with a system message."""


# --------------------------------------------------------------------------- tokenizers


def _byte_chars() -> list[str]:
    """GPT-2 byte-level alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable)) | {b: 256 + n for n, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def make_qwen_tokenizer():
    """Byte-level Qwen2 tokenizer whose chat-template prefix (system message, then
    "<|im_start|>user\\n") is exactly CROP_START tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from engine.models.hunyuan_video15.text_encoder import CROP_START, SYSTEM_MESSAGE

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    # the system text in pieces: specials (3) + "\n" (1) + "user\n" (5 bytes) + pieces = CROP_START
    tok.add_tokens([AddedToken(p, normalized=False, special=False)
                    for p in _template_pieces("system\n" + SYSTEM_MESSAGE, CROP_START - 9)])
    prefix = tok.apply_chat_template([{"role": "system", "content": SYSTEM_MESSAGE}], tokenize=False) + \
        "<|im_start|>user\n"
    if len(tok(prefix, add_special_tokens=False).input_ids) != CROP_START:
        raise AssertionError("tiny Qwen tokenizer: the template prefix is not CROP_START tokens")
    return tok


def _template_pieces(text: str, count: int) -> list[str]:
    """`text` cut into `count` consecutive pieces of 4 or 5 characters that the tokenizer's added-token
    matching (leftmost, then longest) finds again exactly: the first split (over seeded choices of
    which pieces are short) for which no longer piece also matches where a piece starts."""
    import random

    short = 5 * count - len(text)
    for seed in range(10_000):
        fours = set(random.Random(seed).sample(range(count), short))
        pieces, pos = [], 0
        for i in range(count):
            size = 4 if i in fours else 5
            pieces.append(text[pos:pos + size])
            pos += size
        known, found, pos = set(pieces), [], 0
        while pos < len(text):
            match = max((q for q in known if text.startswith(q, pos)), key=len, default=None)
            if match is None:
                break
            found.append(match)
            pos += len(match)
        if found == pieces:
            return pieces
    raise AssertionError("no split of the template text found")


def glyph_tokens() -> list[str]:
    """The Glyph-SDXL-v2 color and font tokens (diffusers' `add_special_token`, multilingual)."""
    return [f"<color-{i}>" for i in range(len(GLYPH_COLORS))] + \
        [f"<{code[:2]}-font-{idx}>" for code, idx in GLYPH_FONTS.items()]


def make_byt5_tokenizer(with_glyph_tokens: bool = True):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer(extra_ids=0)
    if with_glyph_tokens:
        tok.add_tokens(glyph_tokens(), special_tokens=True)
    return tok


# --------------------------------------------------------------------------- weights


def dit_config(**changes):
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiTConfig

    return HunyuanVideo15DiTConfig(**{**TINY_DIT, **changes})


def vae_config(**changes):
    from engine.models.hunyuan_video15.vae import HunyuanVideo15VAEConfig

    return HunyuanVideo15VAEConfig(**{**TINY_VAE, **changes})


def _hf_models(qwen_vocab: int, byt5_vocab: int):
    """The tiny Qwen2.5-VL text model, ByT5 encoder and SigLIP tower, seeded and rescaled."""
    from transformers import (Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipVisionConfig, SiglipVisionModel,
                              T5Config, T5EncoderModel)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(vocab_size=qwen_vocab, bos_token_id=None, eos_token_id=None,
                                                        pad_token_id=None, **TINY_QWEN)).eval()
        byt5 = T5EncoderModel(T5Config(vocab_size=byt5_vocab, **TINY_BYT5)).eval()
        siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).eval()
    return randomize_(qwen, SEED + 3), randomize_(byt5, SEED + 4), randomize_(siglip, SEED + 5)


def siglip_processor():
    from engine.models.hunyuan_video15.image_encoder import siglip_processor_cls

    size = TINY_SIGLIP["image_size"]
    return siglip_processor_cls()(do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True,
                                  rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                                  image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def fingerprint(dit_changes: dict | None = None) -> str:
    """Hash of the generator version, sizes and our modules' parameter names and shapes."""
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiT
    from engine.models.hunyuan_video15.vae import HunyuanVideo15VAE

    with torch.device("meta"):
        layout = {
            "dit": [(k, list(v.shape))
                    for k, v in HunyuanVideo15DiT(dit_config(**(dit_changes or {}))).state_dict().items()],
            "vae": [(k, list(v.shape)) for k, v in HunyuanVideo15VAE(vae_config()).state_dict().items()],
        }
    blob = json.dumps([VERSION, TINY_DIT, dit_changes, TINY_VAE, TINY_QWEN, TINY_BYT5, TINY_SIGLIP, GLYPH_COLORS,
                       GLYPH_FONTS, SCHEDULER_CONFIG, GUIDER_CONFIG, MODEL_INDEX, layout], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- writing


def _quiet_save(model: nn.Module, directory: str) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def write_tiny(directory: str, qk_gain: float = 1.0, scheduler: dict | None = None, guider: dict | None = None,
               dit: dict | None = None, model_index: dict | None = None) -> str:
    """Write the tiny checkpoint (diffusers layout) into `directory`. `scheduler` / `guider` /
    `model_index` replace entries of those configs, `dit` of the DiT config (e.g.
    use_meanflow=True); `qk_gain` sharpens the DiT's attention. Returns `directory`."""
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiT
    from engine.models.hunyuan_video15.vae import HunyuanVideo15VAE

    os.makedirs(directory, exist_ok=True)
    path = lambda *parts: os.path.join(directory, *parts)  # noqa: E731
    # 1. DiT and VAE: our modules, deterministic weights
    dit_cfg = dit_config(**(dit or {}))
    save_diffusers_module(randomize_(HunyuanVideo15DiT(dit_cfg), SEED, qk_gain=qk_gain), path("transformer"),
                    dit_cfg.to_dict(), "HunyuanVideo15Transformer3DModel")
    vae_cfg = vae_config()
    save_diffusers_module(randomize_(HunyuanVideo15VAE(vae_cfg), SEED + 1), path("vae"), vae_cfg.to_dict(),
                    "AutoencoderKLHunyuanVideo15")
    # 2. encoders, tokenizers, image processor (saved by transformers)
    qwen_tok, byt5_tok = make_qwen_tokenizer(), make_byt5_tokenizer()
    qwen, byt5, siglip = _hf_models(len(qwen_tok), len(byt5_tok))
    _quiet_save(qwen, path("text_encoder"))
    _quiet_save(byt5, path("text_encoder_2"))
    _quiet_save(siglip, path("image_encoder"))
    qwen_tok.save_pretrained(path("tokenizer"))
    byt5_tok.save_pretrained(path("tokenizer_2"))
    siglip_processor().save_pretrained(path("feature_extractor"))
    # 3. scheduler, guider, pipeline index, our marker
    for folder, name, config, changes in (("scheduler", "scheduler_config.json", SCHEDULER_CONFIG, scheduler),
                                          ("guider", "guider_config.json", GUIDER_CONFIG, guider)):
        os.makedirs(path(folder), exist_ok=True)
        with open(path(folder, name), "w") as f:
            json.dump({**config, **(changes or {})}, f, indent=2)
    with open(path("model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, **(model_index or {})}, f, indent=2)
    with open(path(MARKER), "w") as f:
        json.dump({"version": VERSION, "fingerprint": fingerprint(dit), "seed": SEED, "qk_gain": qk_gain}, f)
    return directory


def materialize_tiny(root: str | None = None) -> str:
    """The folder of tiny-hunyuanvideo-1.5, generated on first use (atomically). Returns its path."""
    return materialize(VERSION, fingerprint(), write_tiny, root)


# --------------------------------------------------------------------------- official layout


def write_official_layout(diffusers_dir: str, directory: str, version: str = "480p_i2v") -> str:
    """Rewrite a tiny diffusers-layout checkpoint in the official release layout:

        transformer/<version>/config.json + diffusion_pytorch_model.safetensors   (official keys)
        vae/config.json + diffusion_pytorch_model.safetensors                       (official keys)
        scheduler/scheduler_config.json
        text_encoder/llm/          a full Qwen2.5-VL checkpoint (text weights under model.language_model.,
                                   a stand-in vision tower and lm_head), its tokenizer (right padding)
        text_encoder/byt5-small/   the ByT5 config and tokenizer without the glyph tokens
        text_encoder/Glyph-SDXL-v2/assets/{color_idx,multilingual_10-lang_idx}.json,
                                   checkpoints/byt5_model.pt (encoder keys, `module.text_tower.encoder.`)
        vision_encoder/siglip/{image_encoder,feature_extractor}/
    Returns `directory`."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig, T5Config

    from engine.loading import read_json
    from engine.models.hunyuan_video15 import keymaps

    src = lambda *parts: os.path.join(diffusers_dir, *parts)  # noqa: E731
    dst = lambda *parts: os.path.join(directory, *parts)  # noqa: E731
    # 1. DiT: official config and keys
    config = read_json(src("transformer", "config.json"))
    os.makedirs(dst("transformer", version))
    with open(dst("transformer", version, "config.json"), "w") as f:
        json.dump(official_dit_config(config, version), f, indent=2)
    dit = keymaps.dit_diffusers_to_official(load_file(src("transformer", "diffusion_pytorch_model.safetensors")))
    save_file({k: v.contiguous() for k, v in dit.items()},
              dst("transformer", version, "diffusion_pytorch_model.safetensors"))
    # 2. VAE: official config and keys
    vae_cfg = read_json(src("vae", "config.json"))
    os.makedirs(dst("vae"))
    with open(dst("vae", "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKLConv3D", "in_channels": vae_cfg["in_channels"],
                   "out_channels": vae_cfg["out_channels"], "latent_channels": vae_cfg["latent_channels"],
                   "block_out_channels": vae_cfg["block_out_channels"], "layers_per_block": vae_cfg["layers_per_block"],
                   "ffactor_spatial": vae_cfg["spatial_compression_ratio"],
                   "ffactor_temporal": vae_cfg["temporal_compression_ratio"], "sample_size": 256, "sample_tsize": 64,
                   "scaling_factor": vae_cfg["scaling_factor"], "downsample_match_channel": True,
                   "upsample_match_channel": True}, f, indent=2)
    save_file(keymaps.vae_diffusers_to_official(load_file(src("vae", "diffusion_pytorch_model.safetensors"))),
              dst("vae", "diffusion_pytorch_model.safetensors"))
    shutil.copytree(src("scheduler"), dst("scheduler"))
    # 3. Qwen2.5-VL as the full released model: text weights, stand-in vision tower and lm_head
    llm = dst("text_encoder", "llm")
    text_cfg = read_json(src("text_encoder", "config.json"))
    dropped = ("architectures", "model_type", "transformers_version", "dtype")
    text_keys = {k: v for k, v in text_cfg.items() if not k.startswith("_") and k not in dropped}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text_cfg["hidden_size"])
    full = Qwen2_5_VLConfig(text_config=text_keys, vision_config=vision)
    full.save_pretrained(llm)
    weights = {f"model.language_model.{k}": v for k, v in load_file(src("text_encoder", "model.safetensors")).items()}
    gen = torch.Generator().manual_seed(SEED)
    weights["model.visual.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 14, 14, generator=gen)
    weights["lm_head.weight"] = torch.randn(text_cfg["vocab_size"], text_cfg["hidden_size"], generator=gen)
    save_file(weights, os.path.join(llm, "model.safetensors"))
    for name in os.listdir(src("tokenizer")):
        shutil.copy2(src("tokenizer", name), os.path.join(llm, name))
    # 4. ByT5: google/byt5-small's config + tokenizer, the Glyph-SDXL-v2 checkpoint and assets
    byt5_cfg = T5Config.from_pretrained(src("text_encoder_2"))
    plain = make_byt5_tokenizer(with_glyph_tokens=False)
    fields = {k: v for k, v in byt5_cfg.to_dict().items() if k not in ("architectures", "transformers_version")}
    T5Config(**{**fields, "vocab_size": len(plain)}).save_pretrained(dst("text_encoder", "byt5-small"))
    plain.save_pretrained(dst("text_encoder", "byt5-small"))
    glyph = dst("text_encoder", "Glyph-SDXL-v2")
    os.makedirs(os.path.join(glyph, "assets"))
    os.makedirs(os.path.join(glyph, "checkpoints"))
    with open(os.path.join(glyph, "assets", "color_idx.json"), "w") as f:
        json.dump(GLYPH_COLORS, f)
    with open(os.path.join(glyph, "assets", "multilingual_10-lang_idx.json"), "w") as f:
        json.dump(GLYPH_FONTS, f)
    encoder = load_file(src("text_encoder_2", "model.safetensors"))
    encoder.setdefault("encoder.embed_tokens.weight", encoder.get("shared.weight"))
    torch.save({f"module.text_tower.encoder.{k[len('encoder.'):]}": v for k, v in encoder.items()
                if k.startswith("encoder.")}, os.path.join(glyph, "checkpoints", "byt5_model.pt"))
    # 5. SigLIP as FLUX.1-Redux-dev ships it
    shutil.copytree(src("image_encoder"), dst("vision_encoder", "siglip", "image_encoder"))
    shutil.copytree(src("feature_extractor"), dst("vision_encoder", "siglip", "feature_extractor"))
    return directory


def official_dit_config(config: dict, version: str) -> dict:
    """The official release's DiT `config.json` for a diffusers DiT config."""
    heads = config["num_attention_heads"]
    resolution, task = version.split("_")[:2]
    return {
        "_class_name": "HunyuanVideo_1_5_DiffusionTransformer", "patch_size": [1, 1, 1],
        "in_channels": config["out_channels"], "concat_condition": True, "out_channels": config["out_channels"],
        "hidden_size": heads * config["attention_head_dim"], "heads_num": heads,
        "mlp_width_ratio": config["mlp_ratio"], "mlp_act_type": "gelu_tanh",
        "mm_double_blocks_depth": config["num_layers"], "mm_single_blocks_depth": 0,
        "rope_dim_list": list(config["rope_axes_dim"]), "qkv_bias": True, "qk_norm": True, "qk_norm_type": "rms",
        "guidance_embed": False, "use_meanflow": config.get("use_meanflow", False),
        "text_projection": "single_refiner", "use_attention_mask": True,
        "text_states_dim": config["text_embed_dim"], "text_states_dim_2": config["text_embed_2_dim"],
        "rope_theta": config["rope_theta"], "attn_mode": "flash", "glyph_byT5_v2": True,
        "vision_projection": "linear", "vision_states_dim": config["image_embed_dim"],
        "is_reshape_temporal_channels": False, "use_cond_type_embedding": True,
        "ideal_resolution": resolution, "ideal_task": task,
    }


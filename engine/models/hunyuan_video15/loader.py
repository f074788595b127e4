"""Component loaders of HunyuanVideo-1.5 for both checkpoint layouts.

    diffusers layout (one release variant)          official release layout (tencent/HunyuanVideo-1.5)
    model_index.json                                 (none)
    transformer/config.json + *.safetensors          transformer/<version>/config.json + *.safetensors
                                                     (official keys -> keymaps.dit_official_to_diffusers)
    vae/config.json + *.safetensors                  vae/ the same, official names (ffactor_*, down.I.block.J)
    scheduler/, guider/                              scheduler/ (the registry's defaults apply)
    text_encoder/ (Qwen2_5_VLTextModel), tokenizer/  text_encoder/llm/ (the whole Qwen2.5-VL-7B-Instruct)
    text_encoder_2/ (T5EncoderModel), tokenizer_2/   text_encoder/byt5-small/ + text_encoder/Glyph-SDXL-v2/
                                                     (assets/*.json tokens, checkpoints/byt5_model.pt)
    image_encoder/ + feature_extractor/ (I2V)        vision_encoder/siglip/{image_encoder,feature_extractor}/

Everything is built with meta parameters and the checkpoint tensors assigned (engine.loading), one
tensor at a time. The Qwen2.5-VL text model is built without its last `SKIPPED_LAYERS` layers and
final norm (their output is never used): its `last_hidden_state` is diffusers' `hidden_states[-3]`.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from engine.loading import (
    Checkpoint, Layout, Weights, build_module, lazy_safetensors, match_prefix, read_json, read_pth,
)
from engine.models.hunyuan_video15 import keymaps
from engine.models.hunyuan_video15.image_encoder import SiglipImageEncoder, siglip_processor_cls
from engine.models.hunyuan_video15.text_encoder import SKIPPED_LAYERS, HunyuanVideo15TextEncoder
from engine.options import EngineOptions

log = logging.getLogger(__name__)

OFFICIAL_DIT_DIR = "transformer"
OFFICIAL_LLM = os.path.join("text_encoder", "llm")
OFFICIAL_BYT5 = os.path.join("text_encoder", "byt5-small")
OFFICIAL_GLYPH = os.path.join("text_encoder", "Glyph-SDXL-v2")
OFFICIAL_SIGLIP = os.path.join("vision_encoder", "siglip")
OFFICIAL_TARGET_SIZES = {"360p": 480, "480p": 640, "720p": 960, "1080p": 1440}
"""The release's bucket base sizes per resolution (`target_size_config`)."""


DOWNLOADS = {
    OFFICIAL_LLM: "Qwen/Qwen2.5-VL-7B-Instruct",
    OFFICIAL_BYT5: "google/byt5-small",
    OFFICIAL_GLYPH: "Glyph-SDXL-v2 (ModelScope AI-ModelScope/Glyph-SDXL-v2)",
    OFFICIAL_SIGLIP: "black-forest-labs/FLUX.1-Redux-dev (gated)",
}
"""What the release's checkpoints-download.md has users put into each folder (the encoders are
not part of tencent/HunyuanVideo-1.5 itself)."""


def require_official(ckpt: Checkpoint, *parts: str) -> None:
    """FileNotFoundError naming every missing encoder folder of an official release folder and
    where its weights come from."""
    missing = [p for p in parts if not os.path.exists(ckpt.file(p))]
    if missing:
        where = "; ".join(f"{p}: {DOWNLOADS.get(p.split(os.sep + 'checkpoints')[0], '?')}" for p in missing)
        raise FileNotFoundError(f"{ckpt.path} (official HunyuanVideo-1.5 layout) lacks {missing}: the release "
                                f"ships its encoders separately ({where}; see the release's checkpoints-download.md)")


# --------------------------------------------------------------------------- DiT


def official_dit_config(directory: str, target_size: int):
    """`HunyuanVideo15DiTConfig` of an official DiT folder: its `config.json` (hidden_size,
    heads_num, mm_double_blocks_depth, rope_dim_list, use_meanflow, ...), the input widths read from
    the weights' shapes, `target_size` from the registry entry. Refuses what diffusers' model cannot
    express (single-stream blocks, no glyph or vision branch, other patch sizes)."""
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiTConfig

    d = read_json(os.path.join(directory, "config.json"))
    where = os.path.join(directory, "config.json")
    for key, want in (("mm_single_blocks_depth", 0), ("glyph_byT5_v2", True), ("vision_projection", "linear"),
                      ("text_projection", "single_refiner"), ("concat_condition", True),
                      ("is_reshape_temporal_channels", False), ("guidance_embed", False)):
        if d.get(key, want) != want:
            raise ValueError(f"{where}: {key}={d[key]!r} is not a HunyuanVideo-1.5 DiT this engine runs "
                             f"(expects {want!r})")
    if list(d.get("patch_size", [1, 1, 1])) != [1, 1, 1]:
        raise ValueError(f"{where}: patch_size {d['patch_size']} (expects [1, 1, 1])")
    shapes = {k: v.shape for k, v in keymaps.dit_official_to_diffusers(lazy_safetensors(directory)).items()}
    refiner = {k.split(".")[3] for k in shapes if k.startswith("context_embedder.token_refiner.refiner_blocks.")}
    hidden, heads = int(d["hidden_size"]), int(d["heads_num"])
    latent = int(d["in_channels"])
    return HunyuanVideo15DiTConfig(
        in_channels=2 * latent + 1, out_channels=int(d.get("out_channels") or latent),
        num_attention_heads=heads, attention_head_dim=hidden // heads, num_layers=int(d["mm_double_blocks_depth"]),
        num_refiner_layers=len(refiner), mlp_ratio=float(d.get("mlp_width_ratio", 4.0)),
        text_embed_dim=shapes["context_embedder.proj_in.weight"][1],
        text_embed_2_dim=shapes["context_embedder_2.linear_1.weight"][1],
        image_embed_dim=shapes["image_embedder.linear_1.weight"][1],
        rope_theta=float(d.get("rope_theta", 256)), rope_axes_dim=tuple(d.get("rope_dim_list", (16, 56, 56))),
        target_size=target_size, task_type=d.get("ideal_task") or "i2v", use_meanflow=bool(d.get("use_meanflow")),
    )


def read_dit_config(ckpt_path: str, layout: Layout, official_dir: str | None, target_size: int):
    """The DiT config of a checkpoint (diffusers `transformer/`, or official `transformer/<dir>/`)."""
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiTConfig

    if layout == "diffusers":
        return HunyuanVideo15DiTConfig.from_dict(read_json(os.path.join(ckpt_path, "transformer", "config.json")))
    return official_dit_config(os.path.join(ckpt_path, OFFICIAL_DIT_DIR, official_dir), target_size)


def load_dit(ckpt: Checkpoint, options: EngineOptions, official_dir: str | None, target_size: int) -> nn.Module:
    """`HunyuanVideo15DiT` in eval mode on the options' device and dtype, with the options'
    quantization, attention backend, compile and offload applied (with offload on CUDA the weights
    are built in CPU memory, then engine.offload places them)."""
    from engine.attention import check_head_dim, get_backend
    from engine.kernels import optimize_transformer
    from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiT
    from engine.offload import apply_offload, check_offload, storage_device
    from engine.quant import check_quantization
    from engine.quant.checkpoint import check_requested, quantized_names, quantized_skeleton, stored_quantization

    check_offload(options)
    check_quantization(options.quantization, options.torch_device)
    config = read_dit_config(ckpt.path, ckpt.layout, official_dir, target_size)
    check_head_dim(get_backend(options.attention, options.torch_device), config.attention_head_dim)
    factory = lambda: HunyuanVideo15DiT(config)  # noqa: E731
    if ckpt.layout == "diffusers":
        state_dict = lazy_safetensors(ckpt.file("transformer"))
        stored = stored_quantization(read_json(ckpt.file("transformer", "config.json")))
        if stored is not None:  # pre-quantized: 8-bit linears built on meta, no 16-bit weights
            check_requested(stored, options.quantization, ckpt.file("transformer"))
            factory = quantized_skeleton(factory, stored, quantized_names(state_dict))
    else:
        state_dict = keymaps.dit_official_to_diffusers(lazy_safetensors(ckpt.file(OFFICIAL_DIT_DIR, official_dir)))
    model = build_module(factory, state_dict, dtype=options.torch_dtype, device=storage_device(options),
                         keep_in_fp32=HunyuanVideo15DiT.keep_in_fp32)
    return apply_offload(optimize_transformer(model, options), options)


# --------------------------------------------------------------------------- VAE


def load_vae(ckpt: Checkpoint, options: EngineOptions) -> nn.Module:
    """`HunyuanVideo15VAE` in eval mode on the options' device and dtype, decoding in 256-px
    tiles when `options.vae_tiling`."""
    from engine.kernels import optimize_vae
    from engine.models.hunyuan_video15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig, Tiling

    raw = read_json(ckpt.file("vae", "config.json"))
    state_dict = lazy_safetensors(ckpt.file("vae"))
    if ckpt.layout == "diffusers":
        config = HunyuanVideo15VAEConfig.from_dict(raw)
    else:
        config = HunyuanVideo15VAEConfig.from_official(raw)
        state_dict = keymaps.vae_official_to_diffusers(state_dict)
    latent = ckpt.spec.latent
    got = (config.latent_channels, config.spatial_compression_ratio, config.temporal_compression_ratio)
    if got != (latent.channels, latent.spatial, latent.temporal):
        raise ValueError(f"{ckpt.file('vae')}: the VAE has (channels, spatial, temporal) = {got}, "
                         f"{ckpt.spec.name} expects {(latent.channels, latent.spatial, latent.temporal)}")
    vae = build_module(lambda: HunyuanVideo15VAE(config), state_dict, dtype=options.torch_dtype,
                       device=options.torch_device)
    vae.tiling = Tiling() if options.vae_tiling else None
    return optimize_vae(vae, options)


# --------------------------------------------------------------------------- text encoders


def _text_dtype(options: EngineOptions) -> torch.dtype:
    """float16 runs as bfloat16 (T5 and long Qwen activations overflow in float16)."""
    return torch.bfloat16 if options.torch_dtype == torch.float16 else options.torch_dtype


def _qwen_text_weights(state: Weights) -> Weights:
    """The text model's tensors of a Qwen2.5-VL checkpoint under the text model's own names:
    `model.language_model.*` (the whole model saved by current transformers), `model.*` (the
    release), or unprefixed (a text model alone); the vision tower and the LM head are left out."""
    if any(k.startswith("model.language_model.") for k in state):
        prefix = "model.language_model."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items()
                if k.startswith("model.") and not k.startswith("model.visual.")}
    return state


def build_qwen_text_model(config, state: Weights, dtype: torch.dtype, device: torch.device,
                          skipped_layers: int = SKIPPED_LAYERS) -> nn.Module:
    """Qwen2.5-VL's text model with its last `skipped_layers` layers and final norm left out, so
    `last_hidden_state` = the full model's `hidden_states[-(skipped_layers + 1)]`."""
    from transformers import Qwen2_5_VLTextModel

    kept = config.num_hidden_layers - skipped_layers
    if kept < 1:
        raise ValueError(f"the Qwen2.5-VL text model has {config.num_hidden_layers} layers; "
                         f"{skipped_layers} are skipped, none would be left")
    fields = {**config.to_dict(), "num_hidden_layers": kept}
    if fields.get("layer_types"):
        fields["layer_types"] = fields["layer_types"][:kept]
    truncated = config.__class__.from_dict(fields)

    def factory() -> nn.Module:
        model = Qwen2_5_VLTextModel(truncated)
        model.norm = nn.Identity()
        return model

    layer = lambda k: int(k.split(".")[1]) if k.startswith("layers.") else -1  # noqa: E731
    state = {k: v for k, v in state.items() if k != "norm.weight" and layer(k) < kept}
    return build_module(factory, state, dtype=dtype, device=device)


def _fill_tied_t5(state: Weights) -> Weights:
    """T5's `shared` and `encoder.embed_tokens` are one tied matrix; files store either."""
    if "shared.weight" not in state:
        if "encoder.embed_tokens.weight" not in state:
            raise ValueError("the ByT5 checkpoint has no token embedding (shared.weight / encoder.embed_tokens.weight)")
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    return state


def _glyph_weights(path: str) -> Weights:
    """Glyph-SDXL-v2's `byt5_model.pt` as T5EncoderModel keys (diffusers' `load_byt5`: a
    `state_dict` entry if any, `module.text_tower.encoder.` stripped, `encoder.` prepended)."""
    raw = read_pth(path)
    raw = raw.get("state_dict", raw)
    prefix = "module.text_tower.encoder."
    return {"encoder." + (k[len(prefix):] if k.startswith(prefix) else k): v for k, v in raw.items()}


def glyph_tokens(glyph_dir: str) -> list[str]:
    """The color and font tokens Glyph-SDXL-v2 adds to ByT5's tokenizer (multilingual fonts)."""
    colors = read_json(os.path.join(glyph_dir, "assets", "color_idx.json"))
    fonts = read_json(os.path.join(glyph_dir, "assets", "multilingual_10-lang_idx.json"))
    return [f"<color-{i}>" for i in range(len(colors))] + [f"<{code[:2]}-font-{fonts[code]}>" for code in fonts]


def load_text_encoder(ckpt: Checkpoint, options: EngineOptions) -> HunyuanVideo15TextEncoder:
    """Qwen2.5-VL (text model) + its tokenizer and ByT5 + its tokenizer."""
    from transformers import (AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, T5Config,
                              T5EncoderModel)

    dtype, device = _text_dtype(options), options.torch_device
    if ckpt.layout == "diffusers":
        llm_dir, tokenizer = ckpt.file("text_encoder"), AutoTokenizer.from_pretrained(ckpt.file("tokenizer"))
        byt5_tokenizer = ByT5Tokenizer.from_pretrained(ckpt.file("tokenizer_2"))
        byt5_config = T5Config.from_pretrained(ckpt.file("text_encoder_2"))
        byt5_state = lazy_safetensors(ckpt.file("text_encoder_2"), stem="model")
    else:
        glyph_weights = os.path.join(OFFICIAL_GLYPH, "checkpoints", "byt5_model.pt")
        require_official(ckpt, OFFICIAL_LLM, OFFICIAL_BYT5, glyph_weights)
        llm_dir = ckpt.file(OFFICIAL_LLM)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, padding_side="right")  # as the release loads it
        byt5_tokenizer = ByT5Tokenizer.from_pretrained(ckpt.file(OFFICIAL_BYT5))
        byt5_tokenizer.add_tokens(glyph_tokens(ckpt.file(OFFICIAL_GLYPH)), special_tokens=True)
        byt5_state = _glyph_weights(ckpt.file(OFFICIAL_GLYPH, "checkpoints", "byt5_model.pt"))
        byt5_config = T5Config.from_pretrained(ckpt.file(OFFICIAL_BYT5))
        byt5_config.vocab_size = byt5_state["encoder.embed_tokens.weight"].shape[0]
    # Qwen2.5-VL: a text-only config (diffusers) or the whole model's (the release)
    raw = read_json(os.path.join(llm_dir, "config.json"))
    config = Qwen2_5_VLConfig.from_pretrained(llm_dir).text_config if raw.get("model_type") == "qwen2_5_vl" \
        else Qwen2_5_VLTextConfig.from_pretrained(llm_dir)
    mllm = build_qwen_text_model(config, _qwen_text_weights(lazy_safetensors(llm_dir, stem="model")), dtype, device)
    if len(byt5_tokenizer) > byt5_config.vocab_size:
        raise ValueError(f"the ByT5 tokenizer has {len(byt5_tokenizer)} tokens, its encoder "
                         f"{byt5_config.vocab_size} embeddings")
    byt5 = build_module(lambda: T5EncoderModel(byt5_config), _fill_tied_t5(dict(byt5_state)), dtype=dtype,
                        device=device)
    return HunyuanVideo15TextEncoder(mllm, tokenizer, byt5, byt5_tokenizer)


# --------------------------------------------------------------------------- image encoder


def make_siglip_processor(directory: str):
    """The SigLIP image processor of a `feature_extractor/` folder, whichever class name it was
    saved under (SiglipImageProcessor, SiglipImageProcessorFast): built from its settings."""
    settings = read_json(os.path.join(directory, "preprocessor_config.json"))
    kind = settings.pop("image_processor_type", "SiglipImageProcessor")
    if not kind.startswith("SiglipImageProcessor"):
        raise ValueError(f"{directory}: image_processor_type {kind!r} is not a SigLIP image processor")
    settings.pop("processor_class", None)
    return siglip_processor_cls()(**settings)


def load_image_encoder(ckpt: Checkpoint, options: EngineOptions) -> SiglipImageEncoder:
    """SigLIP vision tower + its image processor."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if ckpt.layout == "official":
        require_official(ckpt, OFFICIAL_SIGLIP)
    base = ckpt.path if ckpt.layout == "diffusers" else ckpt.file(OFFICIAL_SIGLIP)
    tower, processor_dir = os.path.join(base, "image_encoder"), os.path.join(base, "feature_extractor")
    config = SiglipVisionConfig.from_pretrained(tower)
    state = lazy_safetensors(tower, stem="model")
    for key in [k for k in state if k.endswith("embeddings.position_ids")]:
        del state[key]  # a buffer older files carry
    # the pooling head is unused (last_hidden_state); build it only when the checkpoint has it
    config.vision_use_head = any(k.startswith(("head.", "vision_model.head.")) for k in state)
    model = build_module(lambda: SiglipVisionModel(config), state, dtype=options.torch_dtype,
                         device=options.torch_device, fit_keys=match_prefix("vision_model."))
    return SiglipImageEncoder(model, make_siglip_processor(processor_dir))


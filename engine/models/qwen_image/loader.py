"""Component loaders of the Qwen-Image family (diffusers layout: the only one the releases ship).

    transformer/config.json + *.safetensors   QwenImageTransformer (our module, diffusers' keys)
    vae/config.json + *.safetensors           AutoencoderKLQwenImage = the Wan2.1 VAE (same keys,
                                              same math on one frame): engine.models.wan.vae.WanVAE
    text_encoder/ (Qwen2_5_VLForConditionalGeneration) + tokenizer/
                                              Qwen2_5_VLModel without the LM head (keys of either
                                              transformers layout: `model.*` + `visual.*`, or
                                              `model.language_model.*` + `model.visual.*`)
    processor/preprocessor_config.json        (edit models) Qwen2VLImageProcessorPil

Everything is built with meta parameters and the checkpoint tensors assigned (engine.loading).
"""
from __future__ import annotations

import os

import torch

from engine.loading import Checkpoint, Weights, build_module, lazy_safetensors, read_json
from engine.models.qwen_image.specs import QwenVariant
from engine.models.qwen_image.text_encoder import QwenTextEncoder
from engine.options import EngineOptions

DIFFUSERS_TRANSFORMER_CLASS = "QwenImageTransformer2DModel"


def read_dit_config(ckpt_path: str):
    """The `QwenImageDiTConfig` of a checkpoint folder's `transformer/`."""
    from engine.models.qwen_image.transformer import QwenImageDiTConfig

    return QwenImageDiTConfig.from_dict(read_json(os.path.join(ckpt_path, "transformer", "config.json")))


def load_dit(ckpt: Checkpoint, options: EngineOptions) -> torch.nn.Module:
    """`QwenImageTransformer` in eval mode on the options' device and dtype, with the options'
    quantization, attention backend, compile and offload applied (as the Wan loader does)."""
    from engine.attention import check_head_dim, get_backend
    from engine.kernels import optimize_transformer
    from engine.models.qwen_image.transformer import QwenImageTransformer
    from engine.offload import apply_offload, check_offload, storage_device
    from engine.quant import check_quantization
    from engine.quant.checkpoint import check_requested, quantized_names, quantized_skeleton, stored_quantization

    check_offload(options)
    check_quantization(options.quantization, options.torch_device)
    path = ckpt.file("transformer")
    config = read_dit_config(ckpt.path)
    check_head_dim(get_backend(options.attention, options.torch_device), config.attention_head_dim)
    factory = lambda: QwenImageTransformer(config)  # noqa: E731
    state_dict = lazy_safetensors(path)
    stored = stored_quantization(read_json(os.path.join(path, "config.json")))
    if stored is not None:  # pre-quantized: 8-bit linears built on meta, no 16-bit weights
        check_requested(stored, options.quantization, path)
        factory = quantized_skeleton(factory, stored, quantized_names(state_dict))
    model = build_module(factory, state_dict, dtype=options.torch_dtype, device=storage_device(options),
                         keep_in_fp32=QwenImageTransformer.keep_in_fp32)
    return apply_offload(optimize_transformer(model, options), options)


def load_vae(ckpt: Checkpoint, options: EngineOptions) -> torch.nn.Module:
    """The VAE (`AutoencoderKLQwenImage` is the Wan2.1 VAE: same parameters, same computation on
    one frame), decoding in tiles when `options.vae_tiling`."""
    from engine.kernels import optimize_vae
    from engine.models.wan.vae import WanVAE, WanVAEConfig, default_tiling

    config = WanVAEConfig.from_dict(read_json(ckpt.file("vae", "config.json")))
    if config.z_dim != ckpt.spec.latent.channels:
        raise ValueError(f"{ckpt.path}: the VAE has {config.z_dim} latent channels, {ckpt.spec.name} "
                         f"expects {ckpt.spec.latent.channels}")
    vae = build_module(lambda: WanVAE(config), lazy_safetensors(ckpt.file("vae")), dtype=options.torch_dtype,
                       device=options.torch_device)
    vae.tiling = default_tiling(config) if options.vae_tiling else None
    return optimize_vae(vae, options)


def vl_model_keys(state_dict: Weights) -> Weights:
    """Qwen2_5_VLForConditionalGeneration keys (either transformers layout) -> Qwen2_5_VLModel
    keys (`language_model.*`, `visual.*`); the LM head is dropped (only hidden states are used)."""
    out: Weights = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue
        if key.startswith(("model.language_model.", "model.visual.")):
            key = key[len("model."):]
        elif key.startswith("model."):
            key = "language_model." + key[len("model."):]
        elif not key.startswith(("visual.", "language_model.")):
            raise ValueError(f"unexpected Qwen2.5-VL checkpoint key {key!r}")
        out[key] = value
    return out


def load_text_encoder(ckpt: Checkpoint, options: EngineOptions, variant: QwenVariant) -> QwenTextEncoder:
    """Qwen2.5-VL (language model and vision tower) + tokenizer (+ the image processor of the
    edit models), conditioning as the variant's pipeline does. float16 is run as bfloat16 (as
    for umT5)."""
    pipeline = variant.conventions
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLModel

    config = Qwen2_5_VLConfig.from_pretrained(ckpt.file("text_encoder"))
    config._attn_implementation = "sdpa"  # as transformers' from_pretrained picks it (the pipelines' reference)
    dtype = torch.bfloat16 if options.torch_dtype == torch.float16 else options.torch_dtype
    state_dict = vl_model_keys(lazy_safetensors(ckpt.file("text_encoder"), stem="model"))
    model = build_module(lambda: Qwen2_5_VLModel(config), state_dict, dtype=dtype, device=options.torch_device)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.file("tokenizer"))
    image_processor = None
    if pipeline.edits:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(ckpt.file("processor"))
    vl_area = variant.reference_area if pipeline.vl_is_reference else (variant.vl_area or pipeline.vl_area)
    return QwenTextEncoder(model, tokenizer, pipeline, image_processor, vl_area)

"""Component loaders of the Wan family (Wan2.1, Wan2.2) for both checkpoint layouts.

    diffusers layout                               official release layout
    model_index.json                               config.json (+ diffusion_pytorch_model*.safetensors)
    transformer/config.json + *.safetensors        -> keymap_dit.official_to_diffusers
    transformer_2/ (Wan2.2 A14B low-noise expert)  high_noise_model/, low_noise_model/ (A14B: each a
                                                   config.json + safetensors; no root DiT)
    vae/config.json + *.safetensors                Wan2.1_VAE.pth -> keymap_vae.official_to_diffusers,
                                                   Wan2.2_VAE.pth (TI2V-5B) -> keymap_vae (nested keys)
    text_encoder/ (UMT5) + tokenizer/              models_t5_umt5-xxl-enc-bf16.pth -> keymap_t5, google/umt5-xxl/
    image_encoder/ (CLIP vision) + image_processor/  models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
                                                   -> keymap_clip (+ the same CLIP preprocessing)

Everything is built with meta parameters and the checkpoint tensors assigned (engine.loading).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

import torch

from engine.loading import (
    Checkpoint, Layout, OFFICIAL_WEIGHTS_STEM, Weights, build_module, lazy_safetensors, match_prefix,
    read_json, read_pth,
)
from engine.models.wan import keymap_clip, keymap_dit, keymap_t5
from engine.models.wan.image_encoder import WanImageEncoder, clip_image_processor_cls
from engine.models.wan.text_encoder import WanTextEncoder
from engine.options import EngineOptions

log = logging.getLogger(__name__)

# official release file names
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_VAE22 = "Wan2.2_VAE.pth"
OFFICIAL_EXPERT_DIRS = ("high_noise_model", "low_noise_model")
"""The official A14B release's expert folders (high-noise first, as specs.TWO_EXPERTS)."""
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_T5_TOKENIZER = os.path.join("google", "umt5-xxl")
OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

DIFFUSERS_TRANSFORMER_CLASS = "WanTransformer3DModel"
OFFICIAL_TRANSFORMER_CLASS = "WanModel"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- configs


def safetensors_shapes(directory: str, stem: str = OFFICIAL_WEIGHTS_STEM) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (no tensor data is read)."""
    return {k: v.shape for k, v in lazy_safetensors(directory, stem).items()}


def read_dit_config(path: str, layout: Layout):
    """The `WanDiTConfig` of the DiT in folder `path` (diffusers: a `transformer*/` folder; official:
    the root or an expert folder): the diffusers `config.json`, or the official `config.json`
    completed from the weights' shapes (text/image/frequency widths, CLIP branch)."""
    from engine.models.wan.transformer import WanDiTConfig

    if layout == "diffusers":
        return WanDiTConfig.from_dict(read_json(os.path.join(path, "config.json")))
    raw_shapes = safetensors_shapes(path)
    has_image = keymap_dit.has_image_embedder(raw_shapes)  # what the weights show, not model_type
    shapes = keymap_dit.official_to_diffusers(raw_shapes)
    config = WanDiTConfig.from_official(read_json(os.path.join(path, "config.json")), has_image_embedder=has_image)
    overrides = {
        "text_dim": shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        "freq_dim": shapes["condition_embedder.time_embedder.linear_1.weight"][1],
    }
    if has_image:
        overrides["image_dim"] = shapes["condition_embedder.image_embedder.norm1.weight"][0]
    return dataclasses.replace(config, **overrides)


def infer_vae_config(state_dict: dict[str, torch.Tensor]):
    """`WanVAEConfig` read off diffusers-keyed VAE tensors (the official `.pth` has no config).

    Encoder down_blocks run level by level: `num_res_blocks` residual blocks (`conv1`), then a
    resample (`resample.1`, plus `time_conv` when it also halves time) between levels.
    """
    from engine.models.wan.vae import WanVAEConfig

    base_dim = state_dict["encoder.conv_in.weight"].shape[0]
    z_dim = state_dict["post_quant_conv.weight"].shape[0]
    indices = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in indices:
        prefix = f"encoder.down_blocks.{i}."
        if prefix + "resample.1.weight" in state_dict:
            temporal.append(prefix + "time_conv.weight" in state_dict)
            levels.append([])
        elif prefix + "conv1.weight" in state_dict:
            levels[-1].append(state_dict[prefix + "conv1.weight"].shape[0])
        else:
            raise ValueError(f"cannot read the VAE structure: encoder.down_blocks.{i} is neither a "
                             "residual block nor a resample")
    dim_mult = []
    for widths in levels:
        if not widths or widths[0] % base_dim:
            raise ValueError(f"cannot read the VAE structure: level widths {widths} vs base_dim {base_dim}")
        dim_mult.append(widths[0] // base_dim)
    return WanVAEConfig(
        base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=len(levels[0]),
        temperal_downsample=tuple(temporal),
    )


def _fill_tied_t5(state_dict: Weights) -> Weights:
    """UMT5's `shared` and `encoder.embed_tokens` are one matrix (tied, as transformers ties them
    on load); files may store either or both. Both keys get the same tensor, so it is read and
    held once (umT5-XXL's embedding is 1 B parameters; a second copy from a file that stores both
    is never read)."""
    if "shared.weight" not in state_dict:
        if "encoder.embed_tokens.weight" not in state_dict:
            raise ValueError("the umT5 checkpoint has no token embedding (neither shared.weight nor "
                             "encoder.embed_tokens.weight)")
        state_dict["shared.weight"] = state_dict["encoder.embed_tokens.weight"]
    state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"]
    return state_dict


# --------------------------------------------------------------------------- components


def load_dit(path: str, layout: Layout, options: EngineOptions) -> torch.nn.Module:
    """`WanTransformer` from the DiT folder `path`, in eval mode on the options' device and dtype
    (norms etc. float32), with the options' quantization, attention backend, compile and offload
    applied (with offload on CUDA the weights are built and optimised in CPU memory, then
    engine.offload places them)."""
    from engine.attention import check_head_dim, get_backend
    from engine.kernels import optimize_transformer  # (also registers the kernels' attention backends)
    from engine.models.wan.transformer import WanTransformer
    from engine.offload import apply_offload, check_offload, storage_device
    from engine.quant import check_quantization
    from engine.quant.checkpoint import check_requested, quantized_names, quantized_skeleton, stored_quantization

    # refuse impossible options before any weight is read (the compute device, not storage)
    check_offload(options)
    check_quantization(options.quantization, options.torch_device)
    config = read_dit_config(path, layout)  # (headers only)
    check_head_dim(get_backend(options.attention, options.torch_device), config.attention_head_dim)
    factory = lambda: WanTransformer(config)  # noqa: E731
    if layout == "diffusers":
        state_dict = lazy_safetensors(path)
        stored = stored_quantization(read_json(os.path.join(path, "config.json")))
        if stored is not None:  # pre-quantized: 8-bit linears built on meta, no 16-bit weights
            check_requested(stored, options.quantization, path)
            factory = quantized_skeleton(factory, stored, quantized_names(state_dict))
    else:
        state_dict = keymap_dit.official_to_diffusers(lazy_safetensors(path))
    # some diffusers exports carry an unused `norm_added_q` (diffusers ignores it too)
    for key in [k for k in state_dict if ".norm_added_q." in k]:
        del state_dict[key]
    model = build_module(
        factory, state_dict, dtype=options.torch_dtype,
        device=storage_device(options), keep_in_fp32=WanTransformer.keep_in_fp32,
    )
    return apply_offload(optimize_transformer(model, options), options)


def load_vae(ckpt: Checkpoint, options: EngineOptions) -> torch.nn.Module:
    """`WanVAE` (the Wan2.1 VAE, or the Wan2.2 VAE of TI2V-5B) in eval mode on the options' device
    and dtype (channels-last on CUDA), decoding in tiles when `options.vae_tiling`."""
    from engine.kernels import optimize_vae
    from engine.models.wan import keymap_vae
    from engine.models.wan.vae import WanVAE, WanVAEConfig, default_tiling

    if ckpt.layout == "diffusers":
        config = WanVAEConfig.from_dict(read_json(ckpt.file("vae", "config.json")))
        state_dict = lazy_safetensors(ckpt.file("vae"))
    elif os.path.isfile(ckpt.file(OFFICIAL_VAE22)):
        state_dict = keymap_vae.official_vae22_to_diffusers(read_pth(ckpt.file(OFFICIAL_VAE22)))
        config = keymap_vae.infer_vae22_config(state_dict)
    else:
        state_dict = keymap_vae.official_to_diffusers(read_pth(ckpt.file(OFFICIAL_VAE)))
        config = infer_vae_config(state_dict)
    if config.z_dim != ckpt.spec.latent.channels:
        raise ValueError(f"{ckpt.path}: the VAE has {config.z_dim} latent channels, {ckpt.spec.name} "
                         f"expects {ckpt.spec.latent.channels}")
    vae = build_module(lambda: WanVAE(config), state_dict, dtype=options.torch_dtype,
                       device=options.torch_device)
    vae.tiling = default_tiling(config) if options.vae_tiling else None
    return optimize_vae(vae, options)  # CUDA: channels-last, fused norms, cuDNN autotuning


def load_text_encoder(ckpt: Checkpoint, options: EngineOptions) -> WanTextEncoder:
    """umT5 encoder + tokenizer. float16 is run as bfloat16 (umT5 overflows in float16)."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    if ckpt.layout == "diffusers":
        config = UMT5Config.from_pretrained(ckpt.file("text_encoder"))
        state_dict = lazy_safetensors(ckpt.file("text_encoder"), stem="model")
        tokenizer_dir = ckpt.file("tokenizer")
    else:
        official = read_pth(ckpt.file(OFFICIAL_T5))
        config = UMT5Config(**keymap_t5.infer_umt5_config(official))
        state_dict = keymap_t5.official_to_hf(official)
        tokenizer_dir = ckpt.file(OFFICIAL_T5_TOKENIZER)
    dtype = torch.bfloat16 if options.torch_dtype == torch.float16 else options.torch_dtype
    model = build_module(lambda: UMT5EncoderModel(config), _fill_tied_t5(state_dict),
                         dtype=dtype, device=options.torch_device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return WanTextEncoder(model, tokenizer, text_len=ckpt.spec.text_len)


def load_clip(ckpt: Checkpoint, options: EngineOptions) -> WanImageEncoder:
    """CLIP ViT-H/14 vision tower + preprocessing (Wan2.1 I2V)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    processor_cls = clip_image_processor_cls()
    if ckpt.layout == "diffusers":
        config = CLIPVisionConfig.from_pretrained(ckpt.file("image_encoder"))
        state_dict = lazy_safetensors(ckpt.file("image_encoder"), stem="model")
        processor = processor_cls.from_pretrained(ckpt.file("image_processor"))
    else:
        official = read_pth(ckpt.file(OFFICIAL_CLIP))
        config = CLIPVisionConfig(**keymap_clip.infer_clip_vision_config(official))
        state_dict = keymap_clip.official_to_hf(official)
        processor = make_clip_processor(config.image_size)
    for key in [k for k in state_dict if k.endswith("embeddings.position_ids")]:
        del state_dict[key]  # a buffer that older files carry; rebuilt in __init__
    model = build_module(lambda: CLIPVisionModel(config), state_dict, dtype=options.torch_dtype,
                         device=options.torch_device, fit_keys=match_prefix(keymap_clip.HF_PREFIX))
    return WanImageEncoder(model, processor)


def make_clip_processor(image_size: int = 224):
    """The CLIP preprocessing of the Wan I2V pipelines: resize the short side, center crop,
    normalise with the OpenAI CLIP mean/std (as the diffusers-layout `image_processor/`)."""
    return clip_image_processor_cls()(
        do_resize=True, size={"shortest_edge": image_size}, resample=3,  # bicubic
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )

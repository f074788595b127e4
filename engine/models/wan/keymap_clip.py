"""Official Wan CLIP checkpoint (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`) <->
transformers `CLIPVisionModel` keys.

Only the vision tower (`visual.*`, Wan's `wan/modules/clip.py` naming) is used; `textual.*`,
`log_scale` and the projection `visual.head` are ignored.

    visual.patch_embedding.weight               -> vision_model.embeddings.patch_embedding.weight
    visual.cls_embedding        (1, 1, D)       -> vision_model.embeddings.class_embedding   (D,)
    visual.pos_embedding        (1, N, D)       -> vision_model.embeddings.position_embedding.weight (N, D)
    visual.pre_norm.*                           -> vision_model.pre_layrnorm.*
    visual.transformer.N.norm1.*                -> vision_model.encoder.layers.N.layer_norm1.*
    visual.transformer.N.attn.to_qkv.* (3D, .)  -> ...self_attn.{q,k,v}_proj.*  (split in three)
    visual.transformer.N.attn.proj.*            -> ...self_attn.out_proj.*
    visual.transformer.N.norm2.*                -> ...layer_norm2.*
    visual.transformer.N.mlp.{0,2}.*            -> ...mlp.{fc1,fc2}.*
    visual.post_norm.*                          -> vision_model.post_layernorm.*
"""
from __future__ import annotations

import math
import re

import torch

Tensor = torch.Tensor

HF_PREFIX = "vision_model."
"""Prefix of the vision tower in `CLIPVisionModel` checkpoints (transformers >= 5.2x builds the
module without it; the loader adds or strips it to match the installed version)."""
_HF = HF_PREFIX
_LAYER_KEYS: tuple[tuple[str, str], ...] = (
    ("norm1", "layer_norm1"),
    ("attn.proj", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("mlp.0", "mlp.fc1"),
    ("mlp.2", "mlp.fc2"),
)
_TOP_KEYS: tuple[tuple[str, str], ...] = (
    ("pre_norm", "pre_layrnorm"),
    ("post_norm", "post_layernorm"),
)
_OFFICIAL_LAYER = re.compile(r"^visual\.transformer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"^(textual\.|log_scale$|visual\.head$|visual\.head\.)")

OPENCLIP_HEAD_DIM = 80
"""ViT-H/14's head size. The official file has fused qkv and no config, so the head count is not
in the tensor shapes: heads = width / 80, or width / 16 for tiny test models (width not a
multiple of 80)."""


def official_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Wan CLIP keys (`visual.*`) -> `CLIPVisionModel` keys; text tower dropped."""
    out: dict[str, Tensor] = {}
    layer_map = dict(_LAYER_KEYS)
    top_map = dict(_TOP_KEYS)
    for key, value in state_dict.items():
        if _IGNORED.match(key):
            continue
        if key == "visual.patch_embedding.weight":
            out[_HF + "embeddings.patch_embedding.weight"] = value
        elif key == "visual.cls_embedding":
            out[_HF + "embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embedding":
            out[_HF + "embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif (m := _OFFICIAL_LAYER.match(key)) is not None:
            n, name, kind = m.groups()
            prefix = f"{_HF}encoder.layers.{n}."
            if name == "attn.to_qkv":
                q, k, v = value.chunk(3, dim=0)
                out[f"{prefix}self_attn.q_proj.{kind}"] = q
                out[f"{prefix}self_attn.k_proj.{kind}"] = k
                out[f"{prefix}self_attn.v_proj.{kind}"] = v
            elif name in layer_map:
                out[f"{prefix}{layer_map[name]}.{kind}"] = value
            else:
                raise KeyError(f"unexpected key {key!r} in the official CLIP checkpoint")
        elif key.startswith("visual.") and key.split(".")[1] in top_map:
            _, name, kind = key.split(".")
            out[f"{_HF}{top_map[name]}.{kind}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in the official CLIP checkpoint")
    return out


def hf_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `official_to_hf` for the vision tower (used to fabricate test checkpoints).
    Keys with or without the `vision_model.` prefix are accepted."""
    state_dict = {k if k.startswith(_HF) else _HF + k: v for k, v in state_dict.items()}
    out: dict[str, Tensor] = {}
    layer_map = {hf: off for off, hf in _LAYER_KEYS}
    top_map = {hf: off for off, hf in _TOP_KEYS}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key == _HF + "embeddings.patch_embedding.weight":
            out["visual.patch_embedding.weight"] = value
        elif key == _HF + "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == _HF + "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif key == _HF + "embeddings.position_ids":
            continue
        elif (m := _HF_LAYER.match(key)) is not None:
            n, name, kind = m.groups()
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((n, kind), {})[name.removeprefix("self_attn.")[0]] = value  # "q" | "k" | "v"
            elif name in layer_map:
                out[f"visual.transformer.{n}.{layer_map[name]}.{kind}"] = value
            else:
                raise KeyError(f"unexpected key {key!r} in the CLIP vision state dict")
        elif key.startswith(_HF) and key.split(".")[1] in top_map:
            _, name, kind = key.split(".")
            out[f"visual.{top_map[name]}.{kind}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in the CLIP vision state dict")
    for (n, kind), parts in qkv.items():
        out[f"visual.transformer.{n}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def infer_clip_vision_config(official: dict[str, Tensor]) -> dict:
    """CLIPVisionConfig keyword arguments read off the official vision tensors' shapes."""
    dim, _, patch, _ = official["visual.patch_embedding.weight"].shape
    num_positions = official["visual.pos_embedding"].shape[-2]
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise ValueError(f"visual.pos_embedding has {num_positions} positions; expected 1 + a square")
    layers = 1 + max(int(m.group(1)) for k in official if (m := _OFFICIAL_LAYER.match(k)))
    head_dim = OPENCLIP_HEAD_DIM if dim % OPENCLIP_HEAD_DIM == 0 else 16
    if dim % head_dim:
        raise ValueError(f"cannot infer the CLIP head count for width {dim} (not a multiple of 80 or 16)")
    return dict(
        hidden_size=int(dim), intermediate_size=int(official["visual.transformer.0.mlp.0.weight"].shape[0]),
        num_hidden_layers=int(layers), num_attention_heads=int(dim // head_dim), num_channels=3,
        image_size=int(grid * patch), patch_size=int(patch), hidden_act="gelu", layer_norm_eps=1e-5,
    )

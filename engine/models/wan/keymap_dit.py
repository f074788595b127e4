"""Wan DiT parameter names: official Wan release <-> diffusers (= `WanTransformer`'s own names).

The map renames a key's leading part; the rest (`.weight`, `.bias`) is kept. Keys inside
`blocks.N.` use the block table, the others the top-level table. The two directions are the same
tables read both ways, so `diffusers_to_official(official_to_diffusers(sd)) == sd`.

Note the norm swap: the official block applies norm1 (self-attention), norm3 (cross-attention,
with affine weights) and norm2 (feed-forward); diffusers numbers them in the order they run, so
official `norm3` is diffusers `norm2` and official `norm2` is diffusers `norm3`.
(Same mapping as diffusers' `scripts/convert_wan_to_diffusers.py`, written as whole-name tables
instead of substring replacements.)
"""
from __future__ import annotations

import re
from typing import Mapping, TypeVar

V = TypeVar("V")

# official prefix -> diffusers prefix, outside the blocks
TOP_LEVEL: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}

# official prefix -> diffusers prefix, after "blocks.N."
BLOCK: dict[str, str] = {
    "modulation": "scale_shift_table",
    "norm1": "norm1",
    "norm3": "norm2",  # cross-attention norm (the swap)
    "norm2": "norm3",  # feed-forward norm (no parameters in released weights)
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}

_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.+)$")


def _rename(key: str, top: Mapping[str, str], block: Mapping[str, str], source: str) -> str:
    """Rename one key by the longest table prefix that ends at a dot (or the key's end)."""
    match = _BLOCK_KEY.match(key)
    head, rest, table = (match.group(1), match.group(2), block) if match else ("", key, top)
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return head + table[old] + rest[len(old):]
    raise ValueError(f"unrecognised {source} Wan DiT key {key!r}")


# prefixes some repackaged official checkpoints (ComfyUI) put before every key
STRIPPED_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def official_to_diffusers(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Official Wan release keys -> diffusers / `WanTransformer` keys. Tensors are not copied.

    A leading `model.diffusion_model.` or `diffusion_model.` is dropped first."""
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[_rename(key, TOP_LEVEL, BLOCK, "official")] = value
    return out


def diffusers_to_official(state_dict: Mapping[str, V]) -> dict[str, V]:
    """diffusers / `WanTransformer` keys -> official Wan release keys. Tensors are not copied."""
    top = {new: old for old, new in TOP_LEVEL.items()}
    block = {new: old for old, new in BLOCK.items()}
    return {_rename(k, top, block, "diffusers"): v for k, v in state_dict.items()}


def has_image_embedder(keys: "Mapping[str, object] | list[str]") -> bool:
    """Whether an official-layout checkpoint has the CLIP image branch (`img_emb.*`)."""
    return any(k.startswith("img_emb.") or ".img_emb." in k for k in keys)

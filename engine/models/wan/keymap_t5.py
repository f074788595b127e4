"""Official Wan umT5 encoder checkpoint (`models_t5_umt5-xxl-enc-bf16.pth`) <-> transformers UMT5 keys.

The official file holds Wan's own `T5Encoder` (`wan/modules/t5.py`, `shared_pos=False`):

    token_embedding.weight                      -> shared.weight (+ encoder.embed_tokens.weight, tied)
    blocks.N.norm1.weight                       -> encoder.block.N.layer.0.layer_norm.weight
    blocks.N.attn.{q,k,v,o}.weight              -> encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.N.pos_embedding.embedding.weight     -> encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.N.norm2.weight                       -> encoder.block.N.layer.1.layer_norm.weight
    blocks.N.ffn.gate.0.weight                  -> encoder.block.N.layer.1.DenseReluDense.wi_0.weight  (GELU branch)
    blocks.N.ffn.fc1.weight                     -> encoder.block.N.layer.1.DenseReluDense.wi_1.weight  (linear branch)
    blocks.N.ffn.fc2.weight                     -> encoder.block.N.layer.1.DenseReluDense.wo.weight
    norm.weight                                 -> encoder.final_layer_norm.weight

Both use tanh-GELU, no attention scaling, 32 bidirectional buckets with max distance 128.
"""
from __future__ import annotations

import re

import torch

Tensor = torch.Tensor

# (official suffix inside blocks.N, HF suffix inside encoder.block.N)
_BLOCK_KEYS: tuple[tuple[str, str], ...] = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_OFFICIAL_TO_HF = dict(_BLOCK_KEYS)
_HF_TO_OFFICIAL = {hf: off for off, hf in _BLOCK_KEYS}
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def official_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Wan T5 encoder keys -> transformers `UMT5EncoderModel` keys."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _OFFICIAL_BLOCK.match(key)) and m.group(2) in _OFFICIAL_TO_HF:
            out[f"encoder.block.{m.group(1)}.{_OFFICIAL_TO_HF[m.group(2)]}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in the official umT5 encoder checkpoint")
    return out


def hf_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `official_to_hf` (used to fabricate official checkpoints in tests)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := _HF_BLOCK.match(key)) and m.group(2) in _HF_TO_OFFICIAL:
            out[f"blocks.{m.group(1)}.{_HF_TO_OFFICIAL[m.group(2)]}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in the UMT5 encoder state dict")
    return out


def infer_umt5_config(official: dict[str, Tensor]) -> dict:
    """UMT5Config keyword arguments read off the official tensors' shapes.

    umT5-XXL: vocab 256384, d_model 4096, d_kv 64, d_ff 10240, 64 heads (from the relative
    position bias, (buckets, heads)), 24 layers.
    """
    vocab, d_model = official["token_embedding.weight"].shape
    num_layers = 1 + max(int(m.group(1)) for k in official if (m := _OFFICIAL_BLOCK.match(k)))
    num_buckets, num_heads = official["blocks.0.pos_embedding.embedding.weight"].shape
    inner = official["blocks.0.attn.q.weight"].shape[0]
    d_ff = official["blocks.0.ffn.fc1.weight"].shape[0]
    return dict(
        vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner // num_heads), d_ff=int(d_ff),
        num_layers=int(num_layers), num_decoder_layers=int(num_layers), num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets), relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )

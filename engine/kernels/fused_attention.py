"""Fused projections for the Wan attentions, applied from outside by module swap.

`fuse_attention(model)` replaces, in every block,
  - `attn1` (WanSelfAttention) by `FusedSelfAttention`: q, k and v in ONE GEMM (`to_qkv`, the three
    weights concatenated at swap time), then RMSNorm + rotary embedding of q and k in one Triton
    pass on CUDA (eager), or the model's own norm and `apply_rope` elsewhere and under
    torch.compile (Inductor fuses them);
  - `attn2` (WanCrossAttention) by `FusedCrossAttention`: text k and v in one GEMM (`to_kv`).
The checkpoint keys are untouched (the swap happens after loading), the model file stays as it is,
and the attention cores (`.core`, the seam for backends and Ulysses) are the same objects. In
float32 on CPU the fused modules give the same outputs as the originals up to GEMM rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.models.wan.transformer import Rope, WanCrossAttention, WanSelfAttention, apply_rope
from engine.modules import swap_modules
from engine.quant import QuantLinear
from engine.requirements import use_triton_kernel


def _fused_linear(*linears: nn.Module) -> nn.Module:
    """One linear whose output is the concatenation of `linears`' outputs (same input): an
    nn.Linear, or for quantized linears (a pre-quantized checkpoint) the same quantized class."""
    if isinstance(linears[0], QuantLinear):
        return type(linears[0]).concatenated(list(linears))
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    has_bias = any(lin.bias is not None for lin in linears)
    with torch.device("meta"):
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:  # a linear without bias contributes zeros
        biases = [lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features) for lin in linears]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


def norm_rope(x: Tensor, norm: nn.RMSNorm, rope: Rope, heads: int) -> Tensor:
    """RMSNorm across heads, head split, rotary embedding: (B, L, D) -> (B, L, H, Dh)."""
    if use_triton_kernel(x) and norm.weight is not None and x.stride(-1) == 1:
        from .norm_rope import rms_norm_rope

        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm_rope(x, norm.weight, eps, rope[0], rope[1], heads)
    return apply_rope(norm(x).unflatten(2, (heads, -1)), rope)


class FusedSelfAttention(nn.Module):
    """WanSelfAttention with one q|k|v GEMM and a fused norm + rotary step (same outputs)."""

    def __init__(self, attn: WanSelfAttention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.dim = attn.to_q.out_features
        self.to_qkv = _fused_linear(attn.to_q, attn.to_k, attn.to_v)
        self.to_out = attn.to_out
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.core = attn.core

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        # 1. one projection, split into q, k, v views (B, L, D) each
        q, k, v = self.to_qkv(x).split(self.dim, dim=-1)
        # 2. RMSNorm across heads + rotary on q and k; head split of v
        q = norm_rope(q, self.norm_q, rope, self.num_heads)  # (B, L, H, Dh)
        k = norm_rope(k, self.norm_k, rope, self.num_heads)  # (B, L, H, Dh)
        v = v.unflatten(2, (self.num_heads, -1))  # (B, L, H, Dh)
        # 3. attention core, heads merged, output projection
        out = self.core(q, k, v).flatten(2, 3).type_as(q)  # (B, L, D)
        return self.to_out[0](out)


class FusedCrossAttention(nn.Module):
    """WanCrossAttention with the text k|v projections in one GEMM (same outputs)."""

    def __init__(self, attn: WanCrossAttention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.dim = attn.to_k.out_features
        self.to_q = attn.to_q
        self.to_kv = _fused_linear(attn.to_k, attn.to_v)
        self.to_out = attn.to_out
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.add_k_proj, self.add_v_proj, self.norm_added_k = attn.add_k_proj, attn.add_v_proj, attn.norm_added_k
        self.core = attn.core

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None) -> Tensor:
        heads = self.num_heads
        # 1. queries from the video tokens, keys/values (one GEMM) from the text tokens
        q = self.norm_q(self.to_q(x)).unflatten(2, (heads, -1))  # (B, L, H, Dh)
        k, v = self.to_kv(context).split(self.dim, dim=-1)  # (B, L_txt, D) each
        k = self.norm_k(k).unflatten(2, (heads, -1))  # (B, L_txt, H, Dh)
        v = v.unflatten(2, (heads, -1))  # (B, L_txt, H, Dh)
        out = self.core(q, k, v).flatten(2, 3).type_as(q)  # (B, L, D)
        # 2. I2V: the same queries against the image tokens, added
        if image_context is not None:
            k_img = self.norm_added_k(self.add_k_proj(image_context)).unflatten(2, (heads, -1))
            v_img = self.add_v_proj(image_context).unflatten(2, (heads, -1))
            out = out + self.core(q, k_img, v_img).flatten(2, 3).type_as(q)  # (B, L, D)
        # 3. output projection
        return self.to_out[0](out)


SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    WanSelfAttention: FusedSelfAttention,
    WanCrossAttention: FusedCrossAttention,
}
"""Original attention class -> its fused replacement (exact type match)."""


def fuse_attention(model: nn.Module) -> int:
    """Swap every attention module of `model` with a registered fused version, in place (before
    quantization: the fused projections then quantize as one linear each). Returns the count."""
    return swap_modules(model, lambda name, m: type(m) in SWAPS, lambda m: SWAPS[type(m)](m))

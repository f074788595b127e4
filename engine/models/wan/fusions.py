"""The Wan modules' fused-kernel replacements: which Wan module becomes which fused module.

Declared here, in the family's folder, on engine.kernels' generic pieces; `WanTransformer.fusions`
returns `DIT_FUSIONS` (engine.dit seam) and `engine.kernels.optimize_transformer` applies it on
CUDA. `VAE_FUSIONS` is the Wan VAE's, for `engine.kernels.optimize_vae(vae, options, VAE_FUSIONS)`.

DiT (`DIT_FUSIONS`), in every block:
  - `attn1` (WanSelfAttention) -> `FusedSelfAttention`: q, k and v in ONE GEMM (`to_qkv`, the three
    weights concatenated at swap time), then RMSNorm + rotary embedding of q and k in one Triton
    pass on CUDA (eager), or the model's own norm and `apply_rope` elsewhere and under
    torch.compile (Inductor fuses them);
  - `attn2` (WanCrossAttention) -> `FusedCrossAttention`: text k and v in one GEMM (`to_kv`);
  - `ffn` (FeedForward, diffusers' layout) -> engine.kernels.fused_ffn's GELU fusions (after
    quantization).
The checkpoint keys are untouched (the swap happens after loading), the model file stays as it is,
and the attention cores (`.core`, the backend and Ulysses seam) are the same objects at the same
paths. In float32 on CPU the fused modules give the same outputs as the originals up to GEMM
rounding.

VAE (`VAE_FUSIONS`): channels-last convolutions (`WanVAE.to_channels_last`), then every `RMSNorm`
-> `FusedRMSNorm` (RMS norm + SiLU in one Triton pass).
"""
from __future__ import annotations

from torch import Tensor, nn

from engine.dit import Fusions
from engine.kernels.fused_attention import concat_linears, norm_rope
from engine.requirements import use_triton_kernel

from .transformer import FeedForward, Rope, WanCrossAttention, WanSelfAttention, apply_rope
from .vae import RMSNorm, WanVAE

# ---------------------------------------------------------------------------------------------
# DiT attention


class FusedSelfAttention(nn.Module):
    """WanSelfAttention with one q|k|v GEMM and a fused norm + rotary step (same outputs)."""

    linear_parts = {"to_qkv": ("to_q", "to_k", "to_v")}
    """engine.lora: the linears `to_qkv` holds, in row order (a LoRA for to_q goes to its rows)."""

    def __init__(self, attn: WanSelfAttention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.dim = attn.to_q.out_features
        self.to_qkv = concat_linears(attn.to_q, attn.to_k, attn.to_v)
        self.to_out = attn.to_out
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.core = attn.core

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        # 1. one projection, split into q, k, v views (B, L, D) each
        q, k, v = self.to_qkv(x).split(self.dim, dim=-1)
        # 2. RMSNorm across heads + rotary on q and k; head split of v
        q = norm_rope(q, self.norm_q, rope, self.num_heads, apply_rope)  # (B, L, H, Dh)
        k = norm_rope(k, self.norm_k, rope, self.num_heads, apply_rope)  # (B, L, H, Dh)
        v = v.unflatten(2, (self.num_heads, -1))  # (B, L, H, Dh)
        # 3. attention core, heads merged, output projection
        out = self.core(q, k, v).flatten(2, 3).type_as(q)  # (B, L, D)
        return self.to_out[0](out)


class FusedCrossAttention(nn.Module):
    """WanCrossAttention with the text k|v projections in one GEMM (same outputs)."""

    linear_parts = {"to_kv": ("to_k", "to_v")}
    """engine.lora: the linears `to_kv` holds, in row order."""

    def __init__(self, attn: WanCrossAttention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.dim = attn.to_k.out_features
        self.to_q = attn.to_q
        self.to_kv = concat_linears(attn.to_k, attn.to_v)
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


DIT_FUSIONS = Fusions(
    swaps={WanSelfAttention: FusedSelfAttention, WanCrossAttention: FusedCrossAttention},
    feed_forwards=(FeedForward,),
)
"""What `WanTransformer.fusions` declares."""


# ---------------------------------------------------------------------------------------------
# VAE: RMS norm (+ SiLU) in one Triton pass


class FusedRMSNorm(RMSNorm):
    """The VAE's RMSNorm (same parameters, same `silu`) through `vae_norm.rms_norm_act` when x
    is a CUDA bf16/fp16 tensor with dense, innermost channels (channels-last(-3d)): one read and
    one write per element, the eager roundings kept (equal up to a rare one-ulp difference).
    Anything else (CPU, float32, contiguous layout, strided views) runs the eager math."""

    def __init__(self, norm: RMSNorm) -> None:
        nn.Module.__init__(self)
        self.scale, self.silu = norm.scale, norm.silu
        self.gamma, self.bias = norm.gamma, norm.bias  # the same tensors: state dict unchanged

    def forward(self, x: Tensor) -> Tensor:
        if use_triton_kernel(x) and x.dim() >= 2 and x.movedim(1, -1).is_contiguous():
            from engine.kernels.vae_norm import rms_norm_act

            return rms_norm_act(x, self.gamma, self.bias, self.scale, self.silu)
        return super().forward(x)


VAE_FUSIONS = Fusions(swaps={RMSNorm: FusedRMSNorm}, prepare=WanVAE.to_channels_last)
"""The Wan VAE's fusions (channels-last first: the fused norm needs channels innermost)."""

"""HunyuanVideo-1.5 DiT: 54 dual-stream blocks over video tokens and a joint text/glyph/image context.

A re-implementation of diffusers 0.42.1 `HunyuanVideo15Transformer3DModel` with the same parameter
names, so a diffusers state dict loads with `strict=True` and no key map (the official release
goes through `keymap_dit.official_to_diffusers`).

Shape letters: B batch, C channels, F/H/W latent frames/height/width, L video tokens (F * H * W,
patch 1x1x1), D model width (heads * head_dim), Dh head dim, L_txt Qwen2.5-VL tokens, L_gly
ByT5 glyph tokens, L_img SigLIP tokens (729), L_ctx = L_img + L_gly + L_txt.

What the model computes, as diffusers does it:
- Input: 65 channels = 32 noisy latents + 32 condition latents (I2V: the image's latents on frame
  0, else zeros) + 1 mask channel (1 on the image's frame); patch 1x1x1, Conv3d to D.
- Timestep: sinusoid (256) -> MLP; a MeanFlow model (`use_meanflow`, the 480p I2V step-distilled
  release) adds the embedding of a second timestep t_r (the next step's).
- Context: Qwen2.5-VL tokens through the token refiner (2 self-attention blocks gated by the
  timestep + the mean text token), ByT5 glyph tokens through a 3-layer MLP, SigLIP image tokens
  through LN-MLP-LN; each stream adds its `cond_type_embed` row (0 text, 1 glyph, 2 image) and
  they are joined as [image, glyph, text].
- Blocks: per stream adaLN-Zero, q/k/v with bias, per-head RMSNorm on q and k, rotary positions on
  the video queries/keys only (3-D, (16, 56, 56) channels for (t, h, w), theta 256, pairs
  interleaved, positions from 0); ONE attention over [video; context] tokens; per-stream output
  projection and GELU-tanh feed-forward.
- Head: adaLN-continuous + Linear to 32 channels.

Padding and masks. diffusers carries fixed-length text (1000 Qwen tokens, 256 ByT5 tokens, 729
image tokens) with masks: a padded token is never a key of a valid query, and a valid query's
result never depends on one, so the video tokens come out the same when the padded tokens are not
there at all. This model takes the valid tokens only (`DiTContext`) and attends without masks: in
text-to-video the (all-zero, fully masked) image tokens are simply absent (`image_tokens=None`),
and so are glyph tokens when the prompt quotes no text.

Sequence parallelism (engine.dit seams). The blocks run on ONE token sequence, [video; context],
so sequence parallelism (Ulysses) splits it like any other: each rank holds a contiguous slice,
whose first part is video tokens and the rest context tokens (a `stream` marker travels with the
tokens through `SequenceHooks.split` to say where the slice changes stream). Each block applies
each stream's weights to its part of the slice and attends with one `AttentionCore` (`attn.core`)
over the slice, which Ulysses turns into attention over the whole sequence. The context tokens'
work is split across ranks too.

Seams: `repeated_blocks` ("transformer_blocks"), `sequence_hooks` ("sequence"),
`sequence_attention` (each block's "attn.core"), `keep_in_fp32`, `quant_skip`, `fusions()`, and
`compile_dynamic` (compiled blocks take any context length without recompiling).
The model has no buffers (rotary tables are computed in `forward`): a meta-device build followed
by `load_state_dict(assign=True)` is complete.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionCore
from engine.dit import Fusions, SequenceHooks

Rope = tuple[Tensor, Tensor]
"""Rotary tables (cos, sin), each (1, L, 1, Dh // 2) float32, one angle per (token, channel pair)."""

BYT5_MAPPER_WIDTH = 2048
"""Hidden width of the ByT5 glyph projection (fixed in diffusers and in the release)."""
TIMESTEP_CHANNELS = 256
"""Width of the sinusoidal timestep embeddings."""
COND_TEXT, COND_GLYPH, COND_IMAGE = 0, 1, 2
"""Rows of `cond_type_embed` per context stream."""


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class HunyuanVideo15DiTConfig:
    """Architecture of a HunyuanVideo-1.5 DiT. Field names equal diffusers' `config.json` keys."""

    in_channels: int = 65
    """Input channels: latents + condition latents + 1 mask channel."""
    out_channels: int = 32
    """Channels of the predicted velocity (= latent channels)."""
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    """Dual-stream blocks."""
    num_refiner_layers: int = 2
    """Token-refiner blocks on the Qwen2.5-VL tokens."""
    mlp_ratio: float = 4.0
    patch_size: int = 1
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 3584
    """Qwen2.5-VL-7B hidden size."""
    text_embed_2_dim: int = 1472
    """ByT5-small d_model."""
    image_embed_dim: int = 1152
    """SigLIP so400m hidden size."""
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    """Rotary channels of a head for the (t, h, w) axes; they sum to attention_head_dim."""
    target_size: int = 640
    """Bucket base size in pixels (640 = 480p, 960 = 720p): the image-to-video size buckets."""
    task_type: str = "i2v"
    """The task the checkpoint was converted for (diffusers' conversion script; informative only:
    its "480p_t2v" entry says "i2v")."""
    use_meanflow: bool = False
    """MeanFlow (step-distilled): a second timestep embedder for t_r."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                     "text_embed_dim", "text_embed_2_dim", "image_embed_dim", "patch_size", "patch_size_t"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm must be 'rms_norm' (the only HunyuanVideo-1.5 q/k norm), got {self.qk_norm!r}")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim \
                or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim must be 3 even sizes summing to attention_head_dim="
                             f"{self.attention_head_dim}, got {self.rope_axes_dim}")
        if (self.patch_size, self.patch_size_t) != (1, 1):
            raise ValueError(f"patch sizes other than 1 are not implemented (HunyuanVideo-1.5 uses 1x1x1), "
                             f"got patch_size={self.patch_size}, patch_size_t={self.patch_size_t}")

    @property
    def inner_dim(self) -> int:
        """Model width D."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HunyuanVideo15DiTConfig":
        """From a diffusers `config.json` dict; unknown and `_`-prefixed keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and not k.startswith("_")})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        return d


# ---------------------------------------------------------------------------------------------
# Embedders


def timestep_embedding(timestep: Tensor, dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] (diffusers `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)`): (B,) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep[:, None].float() * torch.exp(exponent)[None, :]     # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)      # (B, dim)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (keys `linear_1`, `linear_2`: diffusers' TimestepEmbedding and
    PixArtAlphaTextProjection with SiLU)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def embed_timestep(embedder: MLPEmbedder, timestep: Tensor) -> Tensor:
    """(B,) timesteps -> (B, D) in the embedder's dtype (the sinusoid in float32, then cast)."""
    return embedder(timestep_embedding(timestep).to(embedder.linear_1.weight.dtype))


class TimeEmbedding(nn.Module):
    """The blocks' conditioning vector from t (and t_r for MeanFlow models)."""

    def __init__(self, dim: int, use_meanflow: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.timestep_embedder_r = MLPEmbedder(TIMESTEP_CHANNELS, dim) if use_meanflow else None

    def forward(self, t: Tensor, t_r: Tensor | None) -> Tensor:
        temb = embed_timestep(self.timestep_embedder, t)                    # (B, D)
        if t_r is not None:
            temb = temb + embed_timestep(self.timestep_embedder_r, t_r)
        return temb


class ImageProjection(nn.Module):
    """SigLIP tokens -> model width: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, in_dim)
        self.linear_2 = nn.Linear(in_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_out(self.linear_2(F.gelu(self.linear_1(self.norm_in(x)))))


class GlyphProjection(nn.Module):
    """ByT5 tokens -> model width: LayerNorm, then Linear-GELU-Linear-GELU-Linear."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, BYT5_MAPPER_WIDTH)
        self.linear_2 = nn.Linear(BYT5_MAPPER_WIDTH, BYT5_MAPPER_WIDTH)
        self.linear_3 = nn.Linear(BYT5_MAPPER_WIDTH, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.linear_1(self.norm(x)))
        return self.linear_3(F.gelu(self.linear_2(x)))


class ActProj(nn.Module):
    """Linear followed by an activation (key `proj`, as diffusers' GELU / LinearActivation)."""

    def __init__(self, dim_in: int, dim_out: int, activation: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.activation = activation
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"
        """For engine.kernels.fused_ffn (reads `net.0.approximate` of GELU feed-forwards)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return F.silu(x) if self.activation == "silu" else F.gelu(x, approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear -> activation -> Linear (keys `net.0.proj`, `net.2`; index 1 was a dropout)."""

    def __init__(self, dim: int, mult: float, activation: str) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(ActProj(dim, inner, activation), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# Token refiner (Qwen2.5-VL tokens)


class RefinerAttention(nn.Module):
    """Plain self-attention with biased projections (keys `to_q/k/v`, `to_out.0`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.core = AttentionCore()

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (proj(x).unflatten(2, (self.num_heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](self.core(q, k, v).flatten(2, 3))            # (B, L_txt, D)


class RefinerGates(nn.Module):
    """Two gates from the conditioning vector (key `linear`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, c: Tensor) -> tuple[Tensor, Tensor]:
        gate_msa, gate_mlp = self.linear(F.silu(c)).chunk(2, dim=1)          # (B, D) each
        return gate_msa[:, None], gate_mlp[:, None]


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, mlp_ratio, "silu")
        self.norm_out = RefinerGates(dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gate_msa, gate_mlp = self.norm_out(c)
        x = x + self.attn(self.norm1(x)) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class TimeTextEmbedding(nn.Module):
    """The refiner's conditioning: timestep embedding + projection of the mean text token."""

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.text_embedder = MLPEmbedder(text_dim, dim)

    def forward(self, t: Tensor, pooled: Tensor) -> Tensor:
        return embed_timestep(self.timestep_embedder, t).to(pooled.dtype) + self.text_embedder(pooled)


class TokenRefiner(nn.Module):
    """Qwen2.5-VL tokens -> model width, refined by self-attention blocks (keys `time_text_embed`,
    `proj_in`, `token_refiner.refiner_blocks`)."""

    def __init__(self, cfg: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.time_text_embed = TimeTextEmbedding(dim, cfg.text_embed_dim)
        self.proj_in = nn.Linear(cfg.text_embed_dim, dim)
        self.token_refiner = nn.Module()
        self.token_refiner.refiner_blocks = nn.ModuleList(
            [RefinerBlock(dim, cfg.num_attention_heads, cfg.mlp_ratio) for _ in range(cfg.num_refiner_layers)])

    def forward(self, text: Tensor, t: Tensor) -> Tensor:
        """text (B, L_txt, text_dim), valid tokens only; t (B,). Returns (B, L_txt, D)."""
        c = self.time_text_embed(t, text.mean(dim=1))                        # (B, D): masked mean over valid tokens
        x = self.proj_in(text)                                               # (B, L_txt, D)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, c)
        return x


# ---------------------------------------------------------------------------------------------
# Rotary positions (video tokens)


def rope_3d(grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float, device: torch.device) -> Rope:
    """Rotary tables of a (F, H, W) token grid in (f, h, w) order: (1, L, 1, Dh // 2) x 2 float32.
    Angles computed in float32, as diffusers' table (`get_1d_rotary_pos_embed` default dtype)."""
    f, h, w = grid
    cos_parts, sin_parts = [], []
    for axis, (n, dim) in enumerate(zip(grid, axes_dim)):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim // 2,)
        angles = torch.outer(torch.arange(n, dtype=torch.float32, device=device), freqs)           # (n, dim // 2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        angles = angles.view(shape).expand(f, h, w, dim // 2)
        cos_parts.append(angles.cos())
        sin_parts.append(angles.sin())
    cos = torch.cat(cos_parts, dim=-1).reshape(1, f * h * w, 1, -1)       # (1, L, 1, Dh // 2)
    sin = torch.cat(sin_parts, dim=-1).reshape(1, f * h * w, 1, -1)
    return cos, sin


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, L, H, Dh) by the tables (float32 math, one cast)."""
    cos, sin = rope                                                          # (1, L, 1, Dh // 2)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                     # (B, L, H, Dh // 2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Dual-stream block


class Modulation(nn.Module):
    """adaLN-Zero's six vectors from the conditioning vector (key `linear`): shift, scale, gate of
    the attention input, then of the feed-forward input; each (B, 1, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return tuple(m[:, None] for m in self.linear(F.silu(temb)).chunk(6, dim=1))


class JointAttention(nn.Module):
    """q/k/v of both streams, attention over all of them (`core`), per-stream output projection.
    Keys as diffusers' `Attention` with `added_kv_proj_dim`: video `to_q/k/v`, `norm_q/k`,
    `to_out.0`; context `add_q/k/v_proj`, `norm_added_q/k`, `to_add_out`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.core = AttentionCore()

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(2, (self.num_heads, -1))                          # (B, L, H, Dh)

    def forward(self, x: Tensor, c: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """x (B, L_v, D) video tokens, c (B, L_c, D) context tokens, rope for x's tokens."""
        # 1. video q/k/v: per-head RMSNorm, rotary positions
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), rope)          # (B, L_v, H, Dh)
        k = apply_rope(self.norm_k(self._heads(self.to_k(x))), rope)
        v = self._heads(self.to_v(x))
        # 2. context q/k/v: per-head RMSNorm, no positions
        cq = self.norm_added_q(self._heads(self.add_q_proj(c)))               # (B, L_c, H, Dh)
        ck = self.norm_added_k(self._heads(self.add_k_proj(c)))
        cv = self._heads(self.add_v_proj(c))
        # 3. one attention over [video; context], split back per stream
        out = self.core(torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)).flatten(2, 3)
        return self.to_out[0](out[:, :x.shape[1]]), self.to_add_out(out[:, x.shape[1]:])


class DualStreamBlock(nn.Module):
    def __init__(self, cfg: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = Modulation(dim)
        self.norm1_context = Modulation(dim)
        self.attn = JointAttention(dim, cfg.num_attention_heads)
        self.ff = FeedForward(dim, cfg.mlp_ratio, "gelu_tanh")
        self.ff_context = FeedForward(dim, cfg.mlp_ratio, "gelu_tanh")

    def forward(self, x: Tensor, c: Tensor, temb: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """x (B, L_v, D), c (B, L_c, D) (this rank's parts of [video; context]), temb (B, D)."""
        dim = x.shape[-1]
        shift, scale, gate, shift_ff, scale_ff, gate_ff = self.norm1(temb)   # (B, 1, D) each
        c_shift, c_scale, c_gate, c_shift_ff, c_scale_ff, c_gate_ff = self.norm1_context(temb)
        # 1. joint attention on the modulated norms, gated residuals
        hx = F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale) + shift
        hc = F.layer_norm(c, (dim,), eps=1e-6) * (1 + c_scale) + c_shift
        ax, ac = self.attn(hx, hc, rope)
        x = x + ax * gate
        c = c + ac * c_gate
        # 2. feed-forward on the modulated norms, gated residuals
        hx = F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale_ff) + shift_ff
        hc = F.layer_norm(c, (dim,), eps=1e-6) * (1 + c_scale_ff) + c_shift_ff
        return x + gate_ff * self.ff(hx), c + c_gate_ff * self.ff_context(hc)


class OutputNorm(nn.Module):
    """adaLN-continuous before the head (key `linear`: scale first, then shift)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)  # (B, D) each
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class DiTContext:
    """The DiT's text conditioning: valid tokens only, batch first."""

    text: Tensor
    """(B, L_txt, text_embed_dim) Qwen2.5-VL states of the prompt."""
    glyph: Tensor
    """(B, L_gly, text_embed_2_dim) ByT5 states of the quoted text; L_gly = 0 when none."""


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                       # (B, L, D)


class HunyuanVideo15DiT(nn.Module):
    """Latents + timestep + text/glyph (+ image) tokens -> flow-matching velocity."""

    repeated_blocks: ClassVar[str] = "transformer_blocks"
    sequence_hooks: ClassVar[str] = "sequence"
    sequence_attention: ClassVar[tuple[str, ...]] = ("attn.core",)
    """Each block's joint attention: its queries, keys and values all come from the block's token
    sequence [video; context] (see the module docstring)."""
    compile_dynamic: ClassVar[bool] = True
    """engine.kernels.compile_blocks compiles the blocks with dynamic shapes: the context length
    (valid prompt and glyph tokens) differs from prompt to prompt, and a graph specialised to each
    length would recompile for every new prompt."""
    keep_in_fp32: ClassVar[tuple[str, ...]] = ()
    """Nothing: diffusers runs every HunyuanVideo-1.5 weight in the model dtype."""
    quant_skip: ClassVar[tuple[str, ...]] = (
        "image_embedder.*", "context_embedder.*", "context_embedder_2.*",  # conditioning embedders, refiner
        "time_embed.*",                                                      # timestep embedders
        "norm_out.*", "proj_out",                                            # output head
    )
    """Linears engine.quant keeps in high precision: everything outside the dual-stream blocks."""

    def __init__(self, config: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.x_embedder = PatchEmbed(config.in_channels, dim)
        self.image_embedder = ImageProjection(config.image_embed_dim, dim)
        self.context_embedder = TokenRefiner(config)
        self.context_embedder_2 = GlyphProjection(config.text_embed_2_dim, dim)
        self.time_embed = TimeEmbedding(dim, config.use_meanflow)
        self.cond_type_embed = nn.Embedding(3, dim)
        self.sequence = SequenceHooks()
        self.transformer_blocks = nn.ModuleList([DualStreamBlock(config) for _ in range(config.num_layers)])
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, config.out_channels)

    @classmethod
    def fusions(cls) -> Fusions:
        """engine.dit seam: the GELU-tanh feed-forwards may be fused by engine.kernels."""
        return Fusions(feed_forwards=(FeedForward,))

    def forward(self, x: Tensor, timestep: Tensor, context: DiTContext, image_tokens: Tensor | None = None) -> Tensor:
        """x (B, C_in, F, H, W); timestep in [0, 1000]: (B,) or one value, or (B, 2) = (t, t_r)
        for a MeanFlow model (t_r: the next step's timestep, 0 after the last); context: the
        prompt's valid tokens (batch 1 or B); image_tokens (B, L_img, image_embed_dim) SigLIP
        tokens for image-to-video, None for text-to-video. Returns (B, C_out, F, H, W)."""
        cfg = self.config
        b, c_in, f, h, w = x.shape
        if c_in != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, F, H, W), got {tuple(x.shape)}")
        t, t_r = self._timesteps(timestep, b)
        dtype = self.proj_out.weight.dtype

        # 1. video tokens (f, h, w order) and their rotary tables
        tokens = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype)).to(dtype)  # (B, L, D)
        rope = rope_3d((f, h, w), cfg.rope_axes_dim, cfg.rope_theta, x.device)       # (1, L, 1, Dh // 2) x 2

        # 2. conditioning vector, and the context [image, glyph, text] at the model width
        temb = self.time_embed(t, t_r).to(dtype)                                      # (B, D)
        text = self.context_embedder(context.text.to(dtype).expand(b, -1, -1), t)    # (B, L_txt, D)
        streams = [text + self.cond_type_embed.weight[COND_TEXT]]
        glyph = context.glyph.to(dtype).expand(b, -1, -1)
        if glyph.shape[1]:
            streams.insert(0, self.context_embedder_2(glyph) + self.cond_type_embed.weight[COND_GLYPH])
        if image_tokens is not None:
            image = self.image_embedder(image_tokens.to(dtype))                       # (B, L_img, D)
            streams.insert(0, image + self.cond_type_embed.weight[COND_IMAGE])
        ctx = torch.cat(streams, dim=1)                                               # (B, L_ctx, D)

        # 3. one sequence [video; context], this rank's slice of it (identity on one rank)
        n_video, n_ctx = tokens.shape[1], ctx.shape[1]
        seq = torch.cat([tokens, ctx], dim=1)                                         # (B, L + L_ctx, D)
        cos, sin = (F.pad(r, (0, 0, 0, 0, 0, n_ctx)) for r in rope)                   # context: unused rows
        stream = torch.zeros(1, n_video + n_ctx)                                      # CPU: 1 = video token
        stream[:, :n_video] = 1.0
        seq, cos, sin, stream = self.sequence.split(seq, cos, sin, stream)
        n_local = int(stream.sum())                                                   # video tokens in the slice
        xs, cs = seq[:, :n_local], seq[:, n_local:]
        rope_local = (cos[:, :n_local], sin[:, :n_local])

        # 4. dual-stream blocks
        for block in self.transformer_blocks:
            xs, cs = block(xs, cs, temb, rope_local)

        # 5. head on this rank's video tokens; the slices gathered (context rows dropped)
        out = self.proj_out(self.norm_out(xs, temb))                                  # (B, L_local_v, C_out)
        out = torch.cat([out, out.new_zeros(b, cs.shape[1], out.shape[2])], dim=1)    # (B, L_local, C_out)
        out = self.sequence.gather(out)[:, :n_video]                                  # (B, L, C_out)

        # 6. unpatchify (patch 1x1x1): (B, L, C_out) -> (B, C_out, F, H, W)
        return out.transpose(1, 2).reshape(b, -1, f, h, w)

    def _timesteps(self, timestep: Tensor, batch: int) -> tuple[Tensor, Tensor | None]:
        """(t, t_r): t (B,), t_r (B,) for MeanFlow models, else None."""
        meanflow = self.config.use_meanflow
        if meanflow:
            if timestep.shape[-1:] != (2,) or timestep.dim() > 2:
                raise ValueError(f"a MeanFlow model takes timestep (B, 2) = (t, t_r), got {tuple(timestep.shape)}")
            pair = timestep.reshape(-1, 2).expand(batch, 2) if timestep.numel() == 2 else timestep
            return pair[:, 0], pair[:, 1]
        if timestep.numel() == 1:
            return timestep.reshape(1).expand(batch), None
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be (B={batch},) or one value, got {tuple(timestep.shape)}")
        return timestep, None

"""Wan DiT: Wan2.1 (T2V 1.3B / 14B, I2V 14B) and Wan2.2 (A14B experts, TI2V-5B).

A re-implementation of diffusers 0.42.1 `WanTransformer3DModel` with the same parameter names, so a
diffusers state dict loads with `strict=True` and no key map (the official release layout goes
through `keymap_dit.official_to_diffusers`). Wan2.2 adds no layer: the A14B experts are two
Wan2.1-14B-shaped models (I2V with 36 input channels and no CLIP branch), TI2V-5B has 48 latent
channels and takes one timestep per token (diffusers' `expand_timesteps`: the clean first frame
of image-to-video is at t = 0).

Shape letters: B batch, C channels, F/H/W latent frames/height/width, L tokens (F' * H' * W'
after patching), D model width (heads * head_dim), H heads, Dh head dim, L_txt text tokens,
L_img image tokens (257 CLIP tokens for Wan2.1 I2V).

Precision, as diffusers: the time embedder, the modulation tables (`scale_shift_table`) and the
LayerNorms (`norm1/2/3`) stay float32 when the rest is cast to bf16 (`keep_in_fp32`), and the
residual stream is updated in float32 inside each block before being cast back.

Meta-device builds: the model has *no buffers*. The rotary frequencies are computed in `forward`
(a few hundred float64 values, negligible next to a block), so `with torch.device("meta"):
WanTransformer(cfg)` followed by `load_state_dict(sd, assign=True)` gives a complete model and no
`reset_buffers()` step is needed.

Seams for outside code (engine.dit, declared on `WanTransformer`), never flags inside the model:
`repeated_blocks` ("blocks"), `sequence_hooks` ("sequence": `split` the tokens and what is aligned
with them before the blocks, `gather` before the head; identity here, Ulysses shards the token
axis), `sequence_attention` (each block's `attn1.core`, an `engine.attention.AttentionCore`),
`keep_in_fp32`, `quant_skip`, and `fusions` (engine/models/wan/fusions.py: the fused-kernel
module swaps).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionCore
from engine.dit import SequenceHooks, keeps_fp32

if TYPE_CHECKING:
    from engine.dit import Fusions

Rope = tuple[Tensor, Tensor]
"""Rotary tables (cos, sin), each (1, L, 1, Dh // 2) float32: one angle per (token, channel pair).
The token axis is dim 1 (what sequence parallelism shards)."""

QK_NORMS = ("rms_norm_across_heads",)
"""q/k normalisations this model implements (RMSNorm over all heads, before the head split)."""


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of a Wan DiT. Field names equal diffusers' `config.json` keys. Frozen."""

    num_attention_heads: int = 40
    """Attention heads; model width D = heads * attention_head_dim."""
    attention_head_dim: int = 128
    """Channels per head (even; split over t/h/w rotary axes)."""
    in_channels: int = 16
    """Latent channels in (36 for I2V: 16 noisy + 4 mask + 16 conditioning)."""
    out_channels: int = 16
    """Channels of the predicted velocity."""
    ffn_dim: int = 13824
    """Hidden width of the feed-forward layers."""
    num_layers: int = 40
    """Transformer blocks."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of the 3-D patch embedding."""
    text_dim: int = 4096
    """Width of the text-encoder states (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    cross_attn_norm: bool = True
    """LayerNorm (with affine) before cross-attention."""
    qk_norm: str = "rms_norm_across_heads"
    """q/k normalisation; only "rms_norm_across_heads" exists for Wan."""
    eps: float = 1e-6
    """Epsilon of the norms."""
    image_dim: int | None = None
    """Width of the CLIP image tokens (1280 for Wan2.1 I2V); None: no image branch."""
    added_kv_proj_dim: int | None = None
    """Input width of the image key/value projections (= model width for Wan2.1 I2V); None: none."""
    rope_max_seq_len: int = 1024
    """Largest patched F', H' or W' the rotary embedding accepts."""
    pos_embed_seq_len: int | None = None
    """Learned position embedding of the image tokens (FLF2V: 2 * 257); None: none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))  # JSON gives a list
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "ffn_dim", "num_layers", "text_dim", "freq_dim", "rope_max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even (rotary pairs), got {self.attention_head_dim}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "image_dim and added_kv_proj_dim must be both set (I2V with CLIP tokens) or both None, "
                f"got image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
            raise ValueError(
                f"added_kv_proj_dim must equal the model width {self.inner_dim} (the image embedder "
                f"projects CLIP tokens to it), got {self.added_kv_proj_dim}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len needs image_dim (it embeds image token positions)")

    @property
    def inner_dim(self) -> int:
        """Model width D."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image_branch(self) -> bool:
        """True for Wan2.1 I2V: CLIP image tokens attended in every cross-attention."""
        return self.image_dim is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanDiTConfig":
        """From a diffusers `config.json` dict; unknown and `_`-prefixed keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and not k.startswith("_")})

    @classmethod
    def from_official(cls, d: dict[str, Any], has_image_embedder: bool | None = None) -> "WanDiTConfig":
        """From the official Wan release `config.json` (`dim, num_heads, in_dim, model_type, ...`).

        `has_image_embedder`: whether the checkpoint has the CLIP branch (`img_emb.*` keys). By
        default it follows `model_type` ("i2v"/"flf2v"), which is right for Wan2.1; Wan2.2 I2V also
        says "i2v" but has no CLIP branch, so a loader should pass what the weights show
        (`keymap_dit.has_image_embedder(keys)`). `image_dim` defaults to CLIP ViT-H's 1280.
        """
        dim, num_heads = int(d["dim"]), int(d["num_heads"])
        if dim % num_heads:
            raise ValueError(f"official config: dim {dim} is not divisible by num_heads {num_heads}")
        model_type = d.get("model_type", "t2v")
        if has_image_embedder is None:
            has_image_embedder = model_type in ("i2v", "flf2v")
        qk_norm = d.get("qk_norm", True)
        return cls(
            num_attention_heads=num_heads,
            attention_head_dim=dim // num_heads,
            in_channels=int(d["in_dim"]),
            out_channels=int(d["out_dim"]),
            ffn_dim=int(d["ffn_dim"]),
            num_layers=int(d["num_layers"]),
            patch_size=tuple(d.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
            text_dim=int(d.get("text_dim", 4096)),
            freq_dim=int(d.get("freq_dim", 256)),
            cross_attn_norm=bool(d.get("cross_attn_norm", True)),
            qk_norm="rms_norm_across_heads" if qk_norm is True else qk_norm,
            eps=float(d.get("eps", 1e-6)),
            image_dim=int(d.get("image_dim", 1280)) if has_image_embedder else None,
            added_kv_proj_dim=dim if has_image_embedder else None,
            pos_embed_seq_len=2 * 257 if (has_image_embedder and model_type == "flf2v") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """diffusers-style config dict (JSON-ready)."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def to_official(self, text_len: int = 512) -> dict[str, Any]:
        """The official release `config.json` for this architecture (plus `image_dim`, which the
        release fixes at 1280 in code, for I2V models)."""
        if self.pos_embed_seq_len is not None:
            model_type = "flf2v"
        else:
            model_type = "i2v" if (self.has_image_branch or self.in_channels == 36) else "t2v"
        return {
            "_class_name": "WanModel",
            "dim": self.inner_dim,
            "eps": self.eps,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "in_dim": self.in_channels,
            "model_type": model_type,
            "num_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "out_dim": self.out_channels,
            "text_len": text_len,
            "text_dim": self.text_dim,
            "patch_size": list(self.patch_size),
            **({"image_dim": self.image_dim} if self.image_dim is not None else {}),
        }


# ---------------------------------------------------------------------------------------------
# Small layers


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; returns the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class GELUProj(nn.Module):
    """Linear followed by GELU (key `proj`, as diffusers' `GELU`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear. Keys `net.0.proj`, `net.2` (index 1 was a dropout: empty)."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TimestepEmbedder(nn.Module):
    """MLP on the sinusoidal timestep embedding (keys `linear_1`, `linear_2`)."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class TextEmbedder(nn.Module):
    """Projects text-encoder states to the model width (keys `linear_1`, `linear_2`)."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, context: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(context), approximate="tanh"))


class ImageEmbedder(nn.Module):
    """Projects CLIP image tokens to the model width: LayerNorm -> MLP -> LayerNorm."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)  # eps 1e-5 with affine, as diffusers / the release
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None

    def forward(self, image_context: Tensor) -> Tensor:
        if self.pos_embed is not None:
            # FLF2V: the tokens of the first and last frame images, paired into one sequence
            b, n, c = image_context.shape
            image_context = image_context.view(-1, 2 * n, c) + self.pos_embed  # (B, 2 * L_img, C_img)
        return self.norm2(self.ff(self.norm1(image_context)))  # (B, L_img, D)


class ConditionEmbedder(nn.Module):
    """Timestep, text and (I2V) image conditioning, named as diffusers' `condition_embedder`."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextEmbedder(cfg.text_dim, dim)
        self.image_embedder = (
            ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len) if cfg.image_dim is not None else None
        )

    def forward(
        self, timestep: Tensor, context: Tensor, image_context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """timestep (B,) or per token (B, L); returns temb (B, [L,] D), timestep_proj (B, [L,] 6 * D),
        context (B, L_txt, D), image_context (B, L_img, D) or None."""
        # 1. timestep -> temb for the head, and 6 modulation vectors for the blocks (per token:
        #    every token's timestep embedded, as diffusers' 2-D case)
        t_freq = timestep_embedding(timestep.flatten(), self.freq_dim)  # (B [* L], freq_dim) float32
        t_freq = t_freq.unflatten(0, timestep.shape)  # (B, [L,] freq_dim)
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)  # float32 when kept in fp32
        temb = self.time_embedder(t_freq).type_as(context)  # (B, [L,] D)
        timestep_proj = self.time_proj(F.silu(temb))  # (B, [L,] 6 * D)
        # 2. text and image tokens to the model width
        context = self.text_embedder(context)  # (B, L_txt, D)
        if image_context is not None:
            image_context = self.image_embedder(image_context)  # (B, L_img, D)
        return temb, timestep_proj, context, image_context


def timestep_embedding(timestep: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, [cos | sin] (diffusers `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)`): (B,) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


# ---------------------------------------------------------------------------------------------
# Rotary position embedding over (t, h, w)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the t, h and w axes (h = w = 2 * (Dh // 6), t = the rest)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_1d(dim: int, n: int, device: torch.device, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of position * frequency for positions 0..n-1: (n, dim // 2) each, float32.

    Computed in float64 and rounded once, as diffusers' table (on MPS, which has no float64,
    in float32)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))  # (dim // 2,)
    angles = torch.outer(torch.arange(n, dtype=dtype, device=device), freqs)  # (n, dim // 2)
    return angles.cos().float(), angles.sin().float()


def rope_3d(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> Rope:
    """Rotary tables for a (F', H', W') token grid, tokens in (f, h, w) order: (1, L, 1, Dh // 2) x 2."""
    f, h, w = grid
    dims = rope_axis_dims(head_dim)
    (cos_t, sin_t), (cos_h, sin_h), (cos_w, sin_w) = (rope_1d(d, n, device) for d, n in zip(dims, grid))

    def spread(t_part: Tensor, h_part: Tensor, w_part: Tensor) -> Tensor:
        t_part = t_part.view(f, 1, 1, -1).expand(f, h, w, -1)
        h_part = h_part.view(1, h, 1, -1).expand(f, h, w, -1)
        w_part = w_part.view(1, 1, w, -1).expand(f, h, w, -1)
        return torch.cat([t_part, h_part, w_part], dim=-1).reshape(1, f * h * w, 1, -1)  # (1, L, 1, Dh // 2)

    return spread(cos_t, cos_h, cos_w), spread(sin_t, sin_h, sin_w)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, L, H, Dh) by the rope angles: float32 math (the
    tables are float32), each rotated half written straight into x's dtype (as diffusers)."""
    cos, sin = rope  # (1, L, 1, Dh // 2)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, Dh // 2) each
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out  # (B, L, H, Dh)


# ---------------------------------------------------------------------------------------------
# Attention


class WanSelfAttention(nn.Module):
    """Self-attention over the video tokens with q/k RMSNorm and rotary embeddings."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key `to_out.0`, as diffusers
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.core = AttentionCore()

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        # 1. projections, RMSNorm across heads, head split
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.num_heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(self.to_k(x)).unflatten(2, (self.num_heads, -1))  # (B, L, H, Dh)
        v = self.to_v(x).unflatten(2, (self.num_heads, -1))  # (B, L, H, Dh)
        # 2. rotary embeddings on q and k
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # 3. attention (a swappable core), heads merged, output projection
        out = self.core(q, k, v).flatten(2, 3).type_as(q)  # (B, L, D)
        return self.to_out[0](out)


class WanCrossAttention(nn.Module):
    """Cross-attention from the video tokens to the text tokens and, for I2V, the image tokens.

    The two are separate attentions with the same queries, summed (the image one with its own
    key/value projections `add_k_proj`, `add_v_proj` and key norm `norm_added_k`).
    """

    def __init__(self, dim: int, num_heads: int, eps: float, added_kv_proj_dim: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        self.core = AttentionCore()

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None) -> Tensor:
        # 1. queries from the video tokens, keys/values from the text tokens
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.num_heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.num_heads, -1))  # (B, L_txt, H, Dh)
        v = self.to_v(context).unflatten(2, (self.num_heads, -1))  # (B, L_txt, H, Dh)
        out = self.core(q, k, v).flatten(2, 3).type_as(q)  # (B, L, D)
        # 2. I2V: the same queries against the image tokens, added
        if image_context is not None:
            k_img = self.norm_added_k(self.add_k_proj(image_context)).unflatten(2, (self.num_heads, -1))  # (B, L_img, H, Dh)
            v_img = self.add_v_proj(image_context).unflatten(2, (self.num_heads, -1))  # (B, L_img, H, Dh)
            out = out + self.core(q, k_img, v_img).flatten(2, 3).type_as(q)  # (B, L, D)
        # 3. output projection
        return self.to_out[0](out)


# ---------------------------------------------------------------------------------------------
# Block, model


class WanBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, with adaLN modulation from the timestep."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanSelfAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = WanCrossAttention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim, dim, approximate="tanh")
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None, modulation: Tensor,
                rope: Rope) -> Tensor:
        """x (B, L, D); modulation (B, 1, 6, D) float32, one row for all tokens, or (B, L, 6, D)
        per token (aligned with x's tokens)."""
        # 0. modulation, in float32: six (B, 1 | L, D)
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + modulation).unbind(2)

        # 1. self-attention on the modulated norm, gated residual in float32
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)  # (B, L, D)
        x = (x.float() + self.attn1(h, rope) * gate).type_as(x)

        # 2. cross-attention to text (and image) tokens, plain residual
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context, image_context)

        # 3. feed-forward on the modulated norm, gated residual in float32
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        x = (x.float() + self.ffn(h).float() * c_gate).type_as(x)
        return x  # (B, L, D)


class WanTransformer(nn.Module):
    """Wan DiT: latents + timestep(s) + text (+ image) tokens -> flow-matching velocity."""

    repeated_blocks: ClassVar[str] = "blocks"
    """engine.dit seam: the nn.ModuleList of `WanBlock`s."""
    sequence_hooks: ClassVar[str] = "sequence"
    """engine.dit seam: the `SequenceHooks` around the blocks."""
    sequence_attention: ClassVar[tuple[str, ...]] = ("attn1.core",)
    """engine.dit seam: the self-attention core of each block (cross-attention attends to text and
    image tokens that every rank holds whole)."""
    keep_in_fp32: ClassVar[tuple[str, ...]] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    """Parameter-name components kept float32 when the model runs in bf16/fp16 (as diffusers)."""
    cache_signal: ClassVar[str] = "modulation"
    """engine.cache seam: the repeated block's argument carrying the timestep modulation, whose
    change from step to step TeaCache measures (TeaCache's `e0` for Wan)."""
    quant_skip: ClassVar[tuple[str, ...]] = (
        "condition_embedder*",   # time / text / image embedders
        "proj_out",              # output head
        "patch_embedding",       # (a Conv3d anyway)
        "*norm*",                # norms (and anything named like one)
        "*scale_shift_table*",   # modulation
    )
    """Linear layers engine.quant keeps in high precision (fnmatch on the module name)."""
    fusions: ClassVar[str] = "engine.models.wan.fusions:DIT_FUSIONS"
    """engine.dit seam: the fused-kernel module swaps for this model (engine.kernels applies them)."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = ConditionEmbedder(config)
        self.sequence = SequenceHooks()
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @classmethod
    def keeps_fp32(cls, param_name: str) -> bool:
        """Whether a parameter stays float32 in a low-precision model (diffusers' rule: a
        component of the dotted name is in `keep_in_fp32`)."""
        return keeps_fp32(cls, param_name)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, image_context: Tensor | None = None) -> Tensor:
        """x (B, C_in, F, H, W); timestep in [0, 1000]: (B,) one per sample (or one value for all),
        or (B, L) one per token (L = F' * H' * W' in (f, h, w) order; Wan2.2 TI2V image-to-video
        puts the first latent frame's tokens at 0); context (B, L_txt, text_dim); image_context
        (B, L_img, image_dim) for I2V models with a CLIP branch, else None. Returns (B, C_out, F, H, W)."""
        cfg = self.config
        grid = self._token_grid(x.shape)  # (F', H', W')
        b, _, f, h, w = x.shape
        self._check_image_context(image_context)
        timestep = self._check_timestep(timestep, b, math.prod(grid))  # (B,) or (B, L)
        dtype = self.patch_embedding.weight.dtype

        # 1. patchify: (B, C_in, F, H, W) -> (B, L, D) tokens in (f, h, w) order, and their rope
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
        rope = rope_3d(grid, cfg.attention_head_dim, x.device)  # (1, L, 1, Dh // 2) x 2

        # 2. conditioning: temb and modulation per sample or per token, text (B, L_txt, D), image (B, L_img, D)
        context = context.to(dtype)
        image_context = image_context.to(dtype) if image_context is not None else None
        temb, timestep_proj, context, image_context = self.condition_embedder(timestep, context, image_context)
        modulation = timestep_proj.unflatten(-1, (6, -1)).float()  # (B, [L,] 6, D), float32 once for all blocks
        if timestep.dim() == 1:  # one row shared by all tokens: (B, 1, D), (B, 1, 6, D)
            temb, modulation = temb.unsqueeze(1), modulation.unsqueeze(1)

        # 3. blocks, on this rank's share of the tokens (and of the per-token modulation)
        tokens, cos, sin, modulation = self.sequence.split(tokens, *rope, modulation)  # (B, L_local, D), ...
        for block in self.blocks:
            tokens = block(tokens, context, image_context, modulation, (cos, sin))
        tokens = self.sequence.gather(tokens)  # (B, L, D)

        # 4. output head: modulated norm (float32) and projection to patch pixels
        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unbind(2)  # (B, 1 | L, D) each
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        out = self.proj_out(tokens)  # (B, L, pt * ph * pw * C_out)

        # 5. unpatchify: (B, F', H', W', pt, ph, pw, C_out) -> (B, C_out, F, H, W)
        pt, ph, pw = cfg.patch_size
        out = out.reshape(b, *grid, pt, ph, pw, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, F', pt, H', ph, W', pw)
        return out.reshape(b, -1, f, h, w)

    def _token_grid(self, shape: torch.Size) -> tuple[int, int, int]:
        """(F', H', W') of the patched latents; refuses sizes the patch does not divide."""
        if len(shape) != 5 or shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, F, H, W), got {tuple(shape)}")
        grid = []
        for name, size, p in zip(("frames", "height", "width"), shape[2:], self.config.patch_size):
            if size % p:
                raise ValueError(f"latent {name} {size} is not a multiple of the patch size {p}")
            if size // p > self.config.rope_max_seq_len:
                raise ValueError(f"latent {name} {size} gives {size // p} patches, more than "
                                 f"rope_max_seq_len={self.config.rope_max_seq_len}")
            grid.append(size // p)
        return grid[0], grid[1], grid[2]

    @staticmethod
    def _check_timestep(timestep: Tensor, batch: int, tokens: int) -> Tensor:
        """One value -> (B,); (B,) kept; (B, L) or (1, L) -> (B, L); anything else refused."""
        if timestep.numel() == 1:
            return timestep.reshape(-1).expand(batch)
        if timestep.dim() == 2:
            if timestep.shape[1] != tokens or timestep.shape[0] not in (1, batch):
                raise ValueError(f"a per-token timestep must be (B={batch}, L={tokens}) (one per patched "
                                 f"latent token), got {tuple(timestep.shape)}")
            return timestep.expand(batch, tokens)
        if timestep.dim() != 1 or timestep.shape[0] != batch:
            raise ValueError(f"timestep must be (B={batch},) one per sample, or (B, L={tokens}) one per "
                             f"token, got {tuple(timestep.shape)}")
        return timestep

    def _check_image_context(self, image_context: Tensor | None) -> None:
        if self.config.has_image_branch and image_context is None:
            raise ValueError("this Wan model has an image branch (image_dim is set): image_context "
                             f"(B, L_img, {self.config.image_dim}) is required")
        if not self.config.has_image_branch and image_context is not None:
            raise ValueError("this Wan model has no image branch (image_dim is None): image_context must be None")

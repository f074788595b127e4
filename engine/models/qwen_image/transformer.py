"""Qwen-Image DiT: an MMDiT whose every block is dual-stream (text and image tokens with their own
weights, one joint attention over both).

A re-implementation of diffusers 0.42.1 `QwenImageTransformer2DModel` with the same parameter
names (a diffusers state dict loads strictly, no key map), computed as diffusers computes it, in
the same dtypes (it keeps nothing in float32: `keep_in_fp32` is empty, as diffusers').

The engine sees Qwen latents as everyone else's, (B, C, F=1, H, W); the 2x2 packing into tokens of
C * 4 channels happens here, in `forward`, and so does the unpacking of the prediction. Edit models
append the VAE latents of their reference images to the image token sequence (`image_context`);
they are packed the same way, get the rotary frame index 1, 2, ... (the generated image has 0) and,
with `zero_cond_t` (Qwen-Image-Edit-2511), the modulation of timestep 0; only the generated
image's tokens are predicted.

Shape letters: B batch, C latent channels (16), H/W latent height/width, L image tokens
(H/2 * W/2 for the generated image, then the references'), S text tokens, D model width
(heads * head_dim), Hd heads, Dh head dim (128 = 16 + 56 + 56 rotary channels for frame, row, column).

Rotary positions (diffusers' `QwenEmbedRope` with scale_rope): image k (0 = generated, 1.. =
references) is frame k; rows and columns are centred, -(h - h//2) .. h//2 - 1; text token j sits
at m + j on all three axes, m = max over all images of max(h//2, w//2). Channel pairs (2i, 2i+1)
are rotated as complex numbers, in float32.

Meta-device builds: the model has no buffers (the rotary tables are computed in `forward`).

Seams (engine.dit): `repeated_blocks` ("transformer_blocks"), `sequence_hooks` ("sequence",
identity), `keep_in_fp32` (none), `quant_skip` (embedders, output head, norms). No
`sequence_attention`: the joint attention mixes text tokens (held whole) with image tokens, which
the shared Ulysses split does not handle, so a Ulysses degree > 1 is refused; CFG-parallel (the two
guidance branches on two ranks) works.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionCore
from engine.dit import SequenceHooks

Rope = tuple[Tensor, Tensor]
"""(cos, sin), each (L, Dh // 2) float32: one angle per (token, channel pair)."""

ROPE_THETA = 10000


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """Architecture of a Qwen-Image DiT. Field names equal diffusers' `config.json` keys. Frozen."""

    patch_size: int = 2
    """Latent pixels per token side (2x2 packing)."""
    in_channels: int = 64
    """Channels of a packed token: latent channels * patch_size**2."""
    out_channels: int = 16
    """Latent channels of the predicted velocity (per pixel, before packing)."""
    num_layers: int = 60
    """Dual-stream blocks."""
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    """Width of the text-encoder states (Qwen2.5-VL-7B: 3584)."""
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    """Rotary channels of a head given to the frame, row and column axes (sum = head dim)."""
    zero_cond_t: bool = False
    """Qwen-Image-Edit-2511: the reference images' tokens are modulated with timestep 0."""
    guidance_embeds: bool = False
    """A guidance-distilled variant's guidance embedding (no release has one; refused)."""
    use_additional_t_cond: bool = False
    """Qwen-Image-Layered's extra timestep condition (not supported)."""
    use_layer3d_rope: bool = False
    """Qwen-Image-Layered's rotary layout (not supported)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.in_channels != self.out_channels * self.patch_size ** 2:
            raise ValueError(f"in_channels ({self.in_channels}) must be out_channels * patch_size**2 "
                             f"({self.out_channels} * {self.patch_size}**2): tokens are packed latents")
        if len(self.axes_dims_rope) != 3 or any(a % 2 for a in self.axes_dims_rope) \
                or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope must be 3 even sizes summing to attention_head_dim "
                             f"{self.attention_head_dim}, got {self.axes_dims_rope}")
        for name in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"):
            if getattr(self, name):
                raise ValueError(f"{name}=True is not supported (no Qwen-Image or Qwen-Image-Edit release "
                                 "uses it)")

    @property
    def inner_dim(self) -> int:
        """Model width D."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QwenImageDiTConfig":
        """From a diffusers `config.json` dict; unknown and `_`-prefixed keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and not k.startswith("_")})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


# ---------------------------------------------------------------------------------------------
# Small layers


class RMSNorm(nn.Module):
    """diffusers' RMSNorm: float32 statistics; a 16-bit weight casts the normalised input to it."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class GELUProj(nn.Module):
    """Linear then tanh-approximated GELU (key `proj`, as diffusers' `GELU`)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = "tanh"

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, hidden 4 * D. Keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the 256-channel sinusoid (keys `linear_1`, `linear_2`)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """diffusers' `QwenTimestepProjEmbeddings` (key `timestep_embedder`)."""

    channels: ClassVar[int] = 256

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.channels, dim)

    def forward(self, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        """sigma (N,) in [0, 1], in the model dtype -> temb (N, D) in `dtype`."""
        return self.timestep_embedder(timestep_sinusoid(sigma, self.channels).to(dtype))


def timestep_sinusoid(sigma: Tensor, dim: int) -> Tensor:
    """[cos | sin](1000 * sigma * 10000^(-i / (dim/2))) as diffusers' `Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)`: the frequencies are cast to
    sigma's dtype, the product taken in float32, then scaled. (N,) -> (N, dim) float32."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    freqs = torch.exp(exponent).to(sigma.dtype)
    angles = 1000 * (sigma[:, None].float() * freqs[None, :])                 # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)          # (N, dim)


class AdaNormOut(nn.Module):
    """diffusers' `AdaLayerNormContinuous` of the output head: LayerNorm (no affine) modulated by
    (scale, shift) = linear(SiLU(temb)), in that chunk order. Key `linear`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)   # (B, D) each
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


# ---------------------------------------------------------------------------------------------
# Rotary positions


def _inv_freqs(dim: int, device: torch.device) -> Tensor:
    """1 / theta^(2i / dim), i < dim / 2: (dim // 2,) float32, as diffusers' `rope_params`."""
    exponents = torch.arange(0, dim, 2, device=device).to(torch.float32).div(dim)
    return 1.0 / torch.pow(ROPE_THETA, exponents)


def _axis_angles(positions: Tensor, dim: int) -> Tensor:
    """(n,) integer positions -> (n, dim // 2) float32 angles."""
    return torch.outer(positions, _inv_freqs(dim, positions.device))


def _centred(n: int, device: torch.device) -> Tensor:
    """-(n - n//2) .. n//2 - 1 (diffusers' scale_rope positions of a row or column)."""
    return torch.arange(-(n - n // 2), n // 2, device=device)


def rope_tables(grids: Sequence[tuple[int, int, int]], text_len: int, axes: tuple[int, int, int],
                device: torch.device) -> tuple[Rope, Rope]:
    """Rotary tables of the image tokens (images in order, each (f, h, w) token grid in (f, h, w)
    order) and of `text_len` text tokens: ((cos, sin) (L, Dh // 2), (cos, sin) (S, Dh // 2))."""
    d_f, d_h, d_w = axes
    image_angles = []
    for index, (f, h, w) in enumerate(grids):
        a_f = _axis_angles(torch.arange(index, index + f, device=device), d_f)     # (f, d_f // 2)
        a_h = _axis_angles(_centred(h, device), d_h)                               # (h, d_h // 2)
        a_w = _axis_angles(_centred(w, device), d_w)                               # (w, d_w // 2)
        grid = torch.cat([a_f.view(f, 1, 1, -1).expand(f, h, w, -1),
                          a_h.view(1, h, 1, -1).expand(f, h, w, -1),
                          a_w.view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)     # (f, h, w, Dh // 2)
        image_angles.append(grid.reshape(f * h * w, -1))
    image = torch.cat(image_angles)                                                # (L, Dh // 2)
    start = max(max(h // 2, w // 2) for _, h, w in grids)
    text_pos = torch.arange(start, start + text_len, device=device)
    text = torch.cat([_axis_angles(text_pos, d) for d in axes], dim=-1)            # (S, Dh // 2)
    return (image.cos(), image.sin()), (text.cos(), text.sin())


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, L, Hd, Dh) as complex numbers by the rope angles,
    in float32; returns x's dtype."""
    cos, sin = (t[None, :, None, :] for t in rope)                               # (1, L, 1, Dh // 2)
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)                      # (B, L, Hd, Dh // 2)
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).type_as(x)                                            # (B, L, Hd, Dh)


# ---------------------------------------------------------------------------------------------
# Joint attention


class JointAttention(nn.Module):
    """One attention over [text tokens, image tokens], each stream with its own projections and
    q/k RMSNorms (per head). Keys as diffusers' `Attention` with added projections."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])   # key `to_out.0`
        self.to_add_out = nn.Linear(dim, dim)
        self.core = AttentionCore()

    def forward(self, img: Tensor, txt: Tensor, img_rope: Rope, txt_rope: Rope,
                txt_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """img (B, L, D), txt (B, S, D); txt_mask (B, S) bool or None (all valid).
        Returns the attention outputs (img (B, L, D), txt (B, S, D))."""
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731  (B, *, Hd, Dh)
        # 1. q, k, v per stream; RMSNorm of q and k per head; rotary positions
        q_img = apply_rope(self.norm_q(heads(self.to_q(img))), img_rope)
        k_img = apply_rope(self.norm_k(heads(self.to_k(img))), img_rope)
        v_img = heads(self.to_v(img))
        q_txt = apply_rope(self.norm_added_q(heads(self.add_q_proj(txt))), txt_rope)
        k_txt = apply_rope(self.norm_added_k(heads(self.add_k_proj(txt))), txt_rope)
        v_txt = heads(self.add_v_proj(txt))
        # 2. one attention over [text, image] (padded text keys masked out)
        q = torch.cat([q_txt, q_img], dim=1)                                      # (B, S + L, Hd, Dh)
        k = torch.cat([k_txt, k_img], dim=1)
        v = torch.cat([v_txt, v_img], dim=1)
        if txt_mask is None:
            out = self.core(q, k, v)
        else:
            out = masked_attention(q, k, v, txt_mask, img.shape[1])
        out = out.flatten(2, 3).to(q.dtype)                                        # (B, S + L, D)
        # 3. split back, output projections
        s = txt.shape[1]
        return self.to_out[0](out[:, s:].contiguous()), self.to_add_out(out[:, :s].contiguous())


def masked_attention(q: Tensor, k: Tensor, v: Tensor, txt_mask: Tensor, image_tokens: int) -> Tensor:
    """SDPA with padded text keys masked (only for batches of prompts padded to one length; a
    prompt alone is never padded and takes the swappable core). (B, S + L, Hd, Dh) -> same."""
    keep = torch.cat([txt_mask.bool(), txt_mask.new_ones(txt_mask.shape[0], image_tokens, dtype=torch.bool)], 1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Block, model


def _modulate(x: Tensor, params: Tensor, ref_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (B, L, D); params (B, 3 * D) = shift | scale | gate, or with `ref_mask` (1, L, 1) bool
    (True on reference tokens) (2B, 3 * D): the first B rows for the other tokens, the last B for
    the references. Returns (x * (1 + scale) + shift, gate), in x's dtype."""
    shift, scale, gate = params.unsqueeze(1).chunk(3, dim=-1)                   # (B | 2B, 1, D) each
    if ref_mask is not None:
        shift, scale, gate = (torch.where(ref_mask, t[len(t) // 2:], t[:len(t) // 2]) for t in (shift, scale, gate))
    return x * (1 + scale) + shift, gate


class QwenImageBlock(nn.Module):
    """Dual-stream block: per stream adaLN-modulated attention and feed-forward; one joint attention."""

    def __init__(self, cfg: QwenImageDiTConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.img_norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.txt_norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.txt_mlp = FeedForward(dim)

    def forward(self, img: Tensor, txt: Tensor, img_temb: Tensor, txt_temb: Tensor, img_rope: Rope,
                txt_rope: Rope, txt_mask: Tensor | None, ref_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """img (B, L, D), txt (B, S, D); img_temb (B, D), or (2B, D) = [t, 0] with `ref_mask`;
        txt_temb (B, D). Returns (img, txt)."""
        # 0. modulation of each stream: (shift, scale, gate) for the attention, then for the MLP
        img_mod1, img_mod2 = self.img_mod(img_temb).chunk(2, dim=-1)           # (B | 2B, 3 * D) each
        txt_mod1, txt_mod2 = self.txt_mod(txt_temb).chunk(2, dim=-1)           # (B, 3 * D) each

        # 1. joint attention on the modulated norms, gated residuals
        img_in, img_gate = _modulate(self.img_norm1(img), img_mod1, ref_mask)
        txt_in, txt_gate = _modulate(self.txt_norm1(txt), txt_mod1)
        img_attn, txt_attn = self.attn(img_in, txt_in, img_rope, txt_rope, txt_mask)
        img = img + img_gate * img_attn
        txt = txt + txt_gate * txt_attn

        # 2. feed-forward per stream on the modulated norms, gated residuals
        img_in, img_gate = _modulate(self.img_norm2(img), img_mod2, ref_mask)
        img = img + img_gate * self.img_mlp(img_in)
        txt_in, txt_gate = _modulate(self.txt_norm2(txt), txt_mod2)
        txt = txt + txt_gate * self.txt_mlp(txt_in)

        # 3. float16: keep the streams finite (as diffusers)
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        if img.dtype == torch.float16:
            img = img.clip(-65504, 65504)
        return img, txt


def pack(latents: Tensor, patch: int) -> Tensor:
    """(B, C, 1, H, W) -> (B, H/p * W/p, C * p * p) tokens in (row, column) order, channel
    c * p * p + dy * p + dx (diffusers' `_pack_latents`)."""
    b, c, f, h, w = latents.shape
    if f != 1 or h % patch or w % patch:
        raise ValueError(f"latents must be (B, C, 1, H, W) with H, W multiples of {patch}, got {tuple(latents.shape)}")
    x = latents.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: Tensor, height: int, width: int, patch: int) -> Tensor:
    """The inverse of `pack`: (B, H/p * W/p, C * p * p) -> (B, C, 1, H, W)."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 1, height, width)


class QwenImageTransformer(nn.Module):
    """Qwen-Image MMDiT: latents + timestep + text states (+ reference latents) -> velocity."""

    repeated_blocks: ClassVar[str] = "transformer_blocks"
    """engine.dit seam: the nn.ModuleList of `QwenImageBlock`s."""
    sequence_hooks: ClassVar[str] = "sequence"
    """engine.dit seam: the `SequenceHooks` around the blocks (identity; see the module docstring)."""
    sequence_attention: ClassVar[tuple[str, ...]] = ()
    """engine.dit seam: none (joint text + image attention: no Ulysses split; CFG-parallel works)."""
    keep_in_fp32: ClassVar[tuple[str, ...]] = ()
    """Nothing stays float32 in a 16-bit model (diffusers keeps none for Qwen-Image)."""
    quant_skip: ClassVar[tuple[str, ...]] = (
        "img_in", "txt_in",      # input projections
        "time_text_embed*",      # timestep embedder
        "norm_out*", "proj_out",  # output head
        "*norm*",                # norms (and anything named like one)
    )
    """Linear layers engine.quant keeps in high precision (fnmatch on the module name)."""

    def __init__(self, config: QwenImageDiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.sequence = SequenceHooks()
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(config) for _ in range(config.num_layers)])
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * config.out_channels)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, image_context: Sequence[Tensor] | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """x (B, C, 1, H, W) noisy latents; timestep in [0, 1000]: (B,), or one value for all;
        context (B, S, joint_attention_dim) text states; image_context: Edit models' reference
        latents, each (B, C, 1, h_i, w_i) (or (1, ...) shared by the batch), appended to the
        sequence; context_mask (B, S) (1 = token, 0 = padding) or None: all tokens valid.
        Returns the velocity (B, C, 1, H, W)."""
        cfg = self.config
        p = cfg.patch_size
        b, c, _, h, w = x.shape
        if c != cfg.out_channels:
            raise ValueError(f"x must have {cfg.out_channels} latent channels, got {tuple(x.shape)}")
        dtype = self.img_in.weight.dtype
        refs = list(image_context or ())

        # 1. pack the latents and the references into one image token sequence; their token grids
        noise = pack(x.to(dtype), p)                                                # (B, L_0, C * p * p)
        packed = [noise] + [pack(r.to(dtype), p).expand(b, -1, -1) for r in refs]
        grids = [(1, h // p, w // p)] + [(1, r.shape[3] // p, r.shape[4] // p) for r in refs]
        img = self.img_in(torch.cat(packed, dim=1))                                 # (B, L, D)

        # 2. timestep embedding; zero_cond_t: a second one at t = 0 for the reference tokens
        sigma = (timestep.reshape(-1).to(torch.float32) / 1000).expand(b).to(img.dtype)  # (B,)
        ref_mask = None
        if cfg.zero_cond_t:
            sigma = torch.cat([sigma, sigma * 0])                                   # (2B,)
            ref_mask = torch.zeros(1, img.shape[1], 1, dtype=torch.bool, device=img.device)
            ref_mask[:, noise.shape[1]:] = True                                     # (1, L, 1)
        img_temb = self.time_text_embed(sigma, img.dtype)                           # (B | 2B, D)
        temb = img_temb[:b]                                                         # (B, D) at t

        # 3. text: RMSNorm, projection; padding mask (None when every token is valid)
        txt = self.txt_in(self.txt_norm(context.to(dtype)))                         # (B, S, D)
        if context_mask is not None and bool(context_mask.bool().all()):
            context_mask = None

        # 4. rotary tables of the image tokens and the text tokens
        img_rope, txt_rope = rope_tables(grids, txt.shape[1], cfg.axes_dims_rope, x.device)

        # 5. dual-stream blocks
        (img,) = self.sequence.split(img)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, img_temb, temb, img_rope, txt_rope, context_mask, ref_mask)
        img = self.sequence.gather(img)

        # 6. output head on the generated image's tokens only, unpacked
        out = self.proj_out(self.norm_out(img[:, :noise.shape[1]], temb))          # (B, L_0, C * p * p)
        return unpack(out, h, w, p)                                                 # (B, C, 1, H, W)

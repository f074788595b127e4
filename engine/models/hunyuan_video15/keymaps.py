"""Official HunyuanVideo-1.5 release names <-> diffusers names (DiT and VAE), both directions.

The DiT map is diffusers' `scripts/convert_hunyuan_video1_5_to_diffusers.py`
(`convert_hyvideo15_transformer_to_diffusers`): renames, plus two tensor changes:
- the token refiner's fused `self_attn_qkv` is split into `attn.to_q/k/v` (and joined back);
- `final_layer.adaLN_modulation.1` stores (shift, scale), diffusers' `norm_out.linear` (scale,
  shift): the halves are swapped (the same swap both ways).
The VAE map is the same script's `convert_hunyuan_video_15_vae_checkpoint_to_diffusers`: renames
only (`down.I.block.J` -> `down_blocks.I.resnets.J`, `mid.block_1` -> `mid_block.resnets.0`,
`mid.attn_1.q` -> `mid_block.attentions.0.to_q`, `nin_shortcut` -> `conv_shortcut`, ...).

Values may be tensors or `engine.loading.LazyTensor`s; a changed tensor of a lazy one is a
`DerivedTensor`, read (and changed) only when the loader asks for it, one at a time. A key neither
map knows is an error naming it: never a silent partial load.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from engine.loading import LazyTensor, Weights


class DerivedTensor(LazyTensor):
    """A tensor computed from others (lazy or not) when loaded."""

    __slots__ = ("_sources", "_fn")

    def __init__(self, sources: tuple, fn: Callable[..., torch.Tensor], shape: tuple[int, ...], key: str) -> None:
        self._sources, self._fn, self.shape, self.key = sources, fn, tuple(shape), key

    def load(self) -> torch.Tensor:
        return self._fn(*(s.load() if isinstance(s, LazyTensor) else s for s in self._sources))


def _derive(sources: tuple, fn: Callable[..., torch.Tensor], shape: tuple[int, ...], key: str):
    """fn(*sources) now for real tensors, a `DerivedTensor` when any source is lazy."""
    if all(isinstance(s, torch.Tensor) for s in sources):
        return fn(*sources)
    return DerivedTensor(sources, fn, shape, key)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape)


# ---------------------------------------------------------------------------------------------
# Rule tables: (official module path, diffusers module path); {i}/{j} are block indices


DIT_RULES: tuple[tuple[str, str], ...] = (
    ("time_in.mlp.0", "time_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_embed.timestep_embedder.linear_2"),
    ("time_r_in.mlp.0", "time_embed.timestep_embedder_r.linear_1"),
    ("time_r_in.mlp.2", "time_embed.timestep_embedder_r.linear_2"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.individual_token_refiner.blocks.{i}.norm1", "context_embedder.token_refiner.refiner_blocks.{i}.norm1"),
    ("txt_in.individual_token_refiner.blocks.{i}.norm2", "context_embedder.token_refiner.refiner_blocks.{i}.norm2"),
    ("txt_in.individual_token_refiner.blocks.{i}.self_attn_proj",
     "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_out.0"),
    ("txt_in.individual_token_refiner.blocks.{i}.mlp.fc1",
     "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.0.proj"),
    ("txt_in.individual_token_refiner.blocks.{i}.mlp.fc2",
     "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.2"),
    ("txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1",
     "context_embedder.token_refiner.refiner_blocks.{i}.norm_out.linear"),
    ("byt5_in.layernorm", "context_embedder_2.norm"),
    ("byt5_in.fc1", "context_embedder_2.linear_1"),
    ("byt5_in.fc2", "context_embedder_2.linear_2"),
    ("byt5_in.fc3", "context_embedder_2.linear_3"),
    ("vision_in.proj.0", "image_embedder.norm_in"),
    ("vision_in.proj.1", "image_embedder.linear_1"),
    ("vision_in.proj.3", "image_embedder.linear_2"),
    ("vision_in.proj.4", "image_embedder.norm_out"),
    ("img_in.proj", "x_embedder.proj"),
    ("cond_type_embedding", "cond_type_embed"),
    ("double_blocks.{i}.img_mod.linear", "transformer_blocks.{i}.norm1.linear"),
    ("double_blocks.{i}.txt_mod.linear", "transformer_blocks.{i}.norm1_context.linear"),
    ("double_blocks.{i}.img_attn_q", "transformer_blocks.{i}.attn.to_q"),
    ("double_blocks.{i}.img_attn_k", "transformer_blocks.{i}.attn.to_k"),
    ("double_blocks.{i}.img_attn_v", "transformer_blocks.{i}.attn.to_v"),
    ("double_blocks.{i}.img_attn_q_norm", "transformer_blocks.{i}.attn.norm_q"),
    ("double_blocks.{i}.img_attn_k_norm", "transformer_blocks.{i}.attn.norm_k"),
    ("double_blocks.{i}.img_attn_proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn_q", "transformer_blocks.{i}.attn.add_q_proj"),
    ("double_blocks.{i}.txt_attn_k", "transformer_blocks.{i}.attn.add_k_proj"),
    ("double_blocks.{i}.txt_attn_v", "transformer_blocks.{i}.attn.add_v_proj"),
    ("double_blocks.{i}.txt_attn_q_norm", "transformer_blocks.{i}.attn.norm_added_q"),
    ("double_blocks.{i}.txt_attn_k_norm", "transformer_blocks.{i}.attn.norm_added_k"),
    ("double_blocks.{i}.txt_attn_proj", "transformer_blocks.{i}.attn.to_add_out"),
    ("double_blocks.{i}.img_mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("double_blocks.{i}.txt_mlp.fc1", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.fc2", "transformer_blocks.{i}.ff_context.net.2"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("final_layer.linear", "proj_out"),
)

_REFINER_QKV_OFFICIAL = "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv"
_REFINER_QKV_DIFFUSERS = "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_{part}"
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")
"""(shift, scale) officially, (scale, shift) in diffusers."""

VAE_RULES: tuple[tuple[str, str], ...] = tuple(
    (f"{side}.{a}", f"{side}.{b}") for side in ("encoder", "decoder") for a, b in (
        ("down.{i}.block.{j}.nin_shortcut", "down_blocks.{i}.resnets.{j}.conv_shortcut"),
        ("down.{i}.block.{j}", "down_blocks.{i}.resnets.{j}"),
        ("down.{i}.downsample", "down_blocks.{i}.downsamplers.0"),
        ("up.{i}.block.{j}.nin_shortcut", "up_blocks.{i}.resnets.{j}.conv_shortcut"),
        ("up.{i}.block.{j}", "up_blocks.{i}.resnets.{j}"),
        ("up.{i}.upsample", "up_blocks.{i}.upsamplers.0"),
        ("mid.block_1", "mid_block.resnets.0"),
        ("mid.block_2", "mid_block.resnets.1"),
        ("mid.attn_1.q", "mid_block.attentions.0.to_q"),
        ("mid.attn_1.k", "mid_block.attentions.0.to_k"),
        ("mid.attn_1.v", "mid_block.attentions.0.to_v"),
        ("mid.attn_1", "mid_block.attentions.0"),
        ("conv_in", "conv_in"), ("norm_out", "norm_out"), ("conv_out", "conv_out"),
    ))


def _pattern(template: str) -> re.Pattern:
    """'a.{i}.b' -> a regex matching 'a.<digits>.b' followed by '.' + the rest (or the end)."""
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(rf"^{body}(?P<rest>\..+)?$")


def _compile(rules, reverse: bool) -> list[tuple[re.Pattern, str]]:
    return [(_pattern(b if reverse else a), a if reverse else b) for a, b in rules]


def _rename(key: str, compiled: list[tuple[re.Pattern, str]], what: str) -> str:
    for pattern, template in compiled:
        m = pattern.match(key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if k in ("i", "j") and v is not None}
            return template.format(**groups) + (m.group("rest") or "")
    raise ValueError(f"{what}: no mapping for key {key!r} (not a HunyuanVideo-1.5 weight this loader knows)")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_DIT_TO_DIFFUSERS = _compile(DIT_RULES, reverse=False)
_DIT_TO_OFFICIAL = _compile(DIT_RULES, reverse=True)
_QKV = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_qkv\.(weight|bias)$")
_QKV_PART = re.compile(r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$")


def dit_official_to_diffusers(state: Weights) -> Weights:
    """Official DiT keys -> diffusers keys (`HunyuanVideo15Transformer3DModel`)."""
    out: Weights = {}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            block, kind = m.groups()
            size = _shape(value)[0] // 3
            for n, part in enumerate("qkv"):
                name = f"context_embedder.token_refiner.refiner_blocks.{block}.attn.to_{part}.{kind}"
                out[name] = _derive((value,), lambda t, n=n: t.chunk(3, dim=0)[n].contiguous(),
                                    (size, *_shape(value)[1:]), name)
            continue
        name = _rename(key, _DIT_TO_DIFFUSERS, "official DiT")
        if key.startswith(_SWAPPED[0] + "."):
            value = _derive((value,), _swap_halves, _shape(value), name)
        out[name] = value
    return out


def dit_diffusers_to_official(state: Weights) -> Weights:
    """diffusers DiT keys -> official keys (writes the release layout for tests)."""
    out: Weights = {}
    parts: dict[tuple[str, str], dict[str, object]] = {}
    for key, value in state.items():
        m = _QKV_PART.match(key)
        if m:
            block, part, kind = m.groups()
            parts.setdefault((block, kind), {})[part] = value
            continue
        name = _rename(key, _DIT_TO_OFFICIAL, "diffusers DiT")
        if key.startswith(_SWAPPED[1] + "."):
            value = _derive((value,), _swap_halves, _shape(value), name)
        out[name] = value
    for (block, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"refiner block {block}: {kind} of to_q/to_k/to_v incomplete ({sorted(qkv)})")
        name = f"txt_in.individual_token_refiner.blocks.{block}.self_attn_qkv.{kind}"
        sources = (qkv["q"], qkv["k"], qkv["v"])
        shape = (sum(_shape(s)[0] for s in sources), *_shape(sources[0])[1:])
        out[name] = _derive(sources, lambda *t: torch.cat(t, dim=0), shape, name)
    return out


_VAE_TO_DIFFUSERS = _compile(VAE_RULES, reverse=False)
_VAE_TO_OFFICIAL = _compile(VAE_RULES, reverse=True)


def vae_official_to_diffusers(state: Weights) -> Weights:
    """Official VAE keys -> diffusers keys (`AutoencoderKLHunyuanVideo15`); renames only."""
    return {_rename(k, _VAE_TO_DIFFUSERS, "official VAE"): v for k, v in state.items()}


def vae_diffusers_to_official(state: Weights) -> Weights:
    return {_rename(k, _VAE_TO_OFFICIAL, "diffusers VAE"): v for k, v in state.items()}

"""Pre-quantized DiT checkpoints: write the 8-bit weights once, load them without the 16-bit ones.

Quantizing at load time needs the whole 16-bit DiT in memory first (26.7 GiB for Wan-14B) before
its 8-bit copy (13.6 GiB) exists. A pre-quantized checkpoint is a diffusers-layout folder whose
`transformer/` holds, for every quantized linear `name`, `name.weight_q` (FP8 e4m3 or INT8, per
output channel), `name.weight_scale` (float32) and `name.bias`, plus the untouched high-precision
tensors (embedders, norms, modulation, head), and whose `transformer/config.json` names the mode
under QUANT_CONFIG_KEY. Loading builds the model with 8-bit linears on the meta device and assigns
those tensors: peak memory is the 8-bit model, and the result equals quantizing at load time.

    lightx2v quantize /models/Wan2.1-T2V-14B-Diffusers --quantization fp8 -o /models/Wan-14B-fp8
    LightX2V.from_pretrained("/models/Wan-14B-fp8", quantization="fp8")

Writing one (`quantize_checkpoint`) needs the families and lives above them, in engine/checkpoint.py.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

from engine.modules import swap_modules

from .linear import QUANT_MODES

log = logging.getLogger(__name__)

QUANT_CONFIG_KEY = "lightx2v_quantization"
"""Key of `transformer/config.json` that marks a pre-quantized DiT: {"mode": "fp8" | "int8"}."""
QUANTIZED_SUFFIXES = (".weight_q", ".weight_scale")
"""State-dict key endings of quantized linears' tensors (loaded in their stored dtypes)."""
SHARD_BYTES = 5 * 2**30


def stored_quantization(config: dict[str, Any]) -> str | None:
    """The mode a DiT `config.json` dict says its weights are quantized to, else None."""
    entry = config.get(QUANT_CONFIG_KEY)
    if entry is None:
        return None
    mode = entry.get("mode") if isinstance(entry, dict) else None
    if mode not in QUANT_MODES:
        raise ValueError(f"{QUANT_CONFIG_KEY}.mode must be one of {sorted(QUANT_MODES)}, got {entry!r}")
    return mode


def check_requested(mode: str, requested: str, where: str) -> None:
    """A pre-quantized checkpoint runs in its own mode only: refuse another one, naming both."""
    if requested != mode:
        raise ValueError(
            f"quantization={requested!r} does not fit {where}: its DiT is pre-quantized to {mode!r}; "
            f"pass quantization={mode!r} (or load the original 16-bit checkpoint)")


def quantized_names(keys: Iterable[str]) -> set[str]:
    """Module names of the quantized linears in a state dict's keys."""
    suffix = QUANTIZED_SUFFIXES[0]
    return {k[: -len(suffix)] for k in keys if k.endswith(suffix)}


def quantized_skeleton(factory: Callable[[], nn.Module], mode: str,
                       names: set[str]) -> Callable[[], nn.Module]:
    """A factory for `engine.loading.build_module`: `factory()` with the nn.Linear modules called
    `names` replaced by `mode`'s quantized linear on the meta device (nothing allocated)."""
    cls = QUANT_MODES[mode]

    def build() -> nn.Module:
        model = factory()
        found = swap_modules(
            model, lambda name, m: name in names and type(m) is nn.Linear,
            lambda lin: cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta"))
        if found != len(names):
            linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
            raise ValueError(f"pre-quantized weights name {len(names)} linears, the model has {found} of them: "
                             f"e.g. {sorted(names - linears)[:3]}")
        return model

    return build


def save_quantized_dit(model: nn.Module, config: dict[str, Any], mode: str, out_dir: str) -> int:
    """Write a quantized DiT (its linears already swapped, unfused) as diffusers `transformer/`
    files: config.json with QUANT_CONFIG_KEY, safetensors shards of <= SHARD_BYTES and their
    index. Returns the bytes written."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if not quantized_names(state):
        raise ValueError("save_quantized_dit: the model has no quantized linears (quantize it first)")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(out_dir, "diffusion_pytorch_model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump({**config, QUANT_CONFIG_KEY: {"mode": mode}}, fh, indent=1)
    return total

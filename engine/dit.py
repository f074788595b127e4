"""The seams of a diffusion transformer (DiT): what shared code may know of a model, declared on its class.

Offload, torch.compile, quantization, fused kernels and sequence parallelism work on any DiT
through these declarations and the helpers below, never through attribute names of one family
(diffusers declares the same things as `_repeated_blocks`, `_keep_in_fp32_modules`, ...):

    class MyDiT(nn.Module):
        repeated_blocks = "blocks"                # offload="block", compile_blocks, Ulysses
        sequence_hooks = "sequence"               # a SequenceHooks module: split / gather the tokens
        sequence_attention = ("attn1.core",)      # per block: AttentionCores over the token sequence
        keep_in_fp32 = ("time_embedder", "norm1")  # loaders keep these parameters float32
        quant_skip = ("proj_out", "*norm*")       # engine.quant never quantizes these linears
        config: MyConfig                          # with num_attention_heads

        compile_dynamic = True                    # optional: token counts vary per call (compile dynamic)

        @classmethod
        def fusions(cls) -> Fusions: ...          # optional: the family's fused-kernel module swaps

`check_dit(model)` says which declaration is missing. This module imports no model and no kernel.
"""
from __future__ import annotations

import importlib

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# The protocol


@runtime_checkable
class DiT(Protocol):
    """What a DiT class declares (class attributes) for the shared code."""

    repeated_blocks: ClassVar[str]
    """Attribute holding the nn.ModuleList of the repeated transformer blocks (identical tensor
    shapes: offload="block" streams them through one slot size; compile_blocks compiles each)."""
    sequence_hooks: ClassVar[str]
    """Attribute holding the `SequenceHooks` module the forward calls around the blocks."""
    sequence_attention: ClassVar[tuple[str, ...]]
    """Paths, inside each repeated block, of the AttentionCores whose queries, keys and values all
    come from the block's token sequence (self-attention): sequence parallelism wraps them.
    Cores attending to tokens every rank holds whole (text cross-attention) are not listed."""
    keep_in_fp32: ClassVar[tuple[str, ...]]
    """Parameter-name components kept float32 when the model runs in 16 bits (diffusers'
    `_keep_in_fp32_modules` rule: a component of the dotted name is in the tuple)."""
    quant_skip: ClassVar[tuple[str, ...]]
    """fnmatch patterns of nn.Linear module names (whole name, or its last component) that are
    never quantized (embedders, output head, modulation)."""
    config: Any
    """The architecture; exposes `num_attention_heads` (Ulysses splits heads)."""


@dataclass(frozen=True)
class Fusions:
    """A family's fused-kernel module swaps: declared in the family's folder, applied on CUDA by
    `engine.kernels.optimize_transformer` / `optimize_vae` (engine.kernels imports no model).

    A replacement is built from the original module and shares its parameters (state-dict keys
    unchanged), and keeps the seams at their paths (`sequence_attention` cores, for example)."""

    swaps: Mapping[type[nn.Module], Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    """Exact module type -> its fused replacement; applied before quantization (a fused q|k|v
    projection then quantizes as one linear)."""
    feed_forwards: tuple[type[nn.Module], ...] = ()
    """Feed-forward classes in diffusers' layout (`net.0.proj` Linear with `net.0.approximate`,
    `net.2` Linear) whose GELU engine.kernels.fused_ffn may fuse; applied after quantization."""
    prepare: Callable[[nn.Module], Any] | None = None
    """Called on the module first, on CUDA (e.g. a VAE's channels-last conversion)."""


NO_FUSIONS = Fusions()
"""For a module whose class declares no `fusions`."""


class SequenceHooks(nn.Module):
    """Identity seam around the repeated blocks; sequence parallelism swaps in a version that shards.

    `split(x, *aligned)`: x (B, L, D) tokens and tensors aligned with them on dim 1 (rotary
    tables (1, L, 1, Dh // 2), per-token modulation (B, L, 6, D), ...) -> this rank's slices of
    each, in the same order. An aligned tensor of size 1 on dim 1 is shared by all tokens (e.g.
    per-sample modulation (B, 1, 6, D)) and is returned whole. `gather(x)`: this rank's
    (B, L_local, D) -> the full (B, L, D).
    """

    def split(self, x: Tensor, *aligned: Tensor) -> tuple[Tensor, ...]:
        return (x, *aligned)

    def gather(self, x: Tensor) -> Tensor:
        return x


# ---------------------------------------------------------------------------------------------
# Helpers: shared code reads a model's seams only through these


SEAMS = ("repeated_blocks", "sequence_hooks", "sequence_attention", "keep_in_fp32", "quant_skip")


def _declared(model: nn.Module | type, seam: str) -> Any:
    cls = model if isinstance(model, type) else type(model)
    value = getattr(cls, seam, None)
    if value is None:
        raise TypeError(f"{cls.__name__} does not declare `{seam}` (a DiT seam, see engine.dit.DiT)")
    return value


def check_dit(model: nn.Module | type) -> None:
    """Raise TypeError naming the first DiT seam the class does not declare."""
    for seam in SEAMS:
        _declared(model, seam)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks (`repeated_blocks`); TypeError if undeclared or not a non-empty ModuleList."""
    name = _declared(model, "repeated_blocks")
    blocks = getattr(model, name, None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__}.{name} (its `repeated_blocks`) is not a non-empty nn.ModuleList")
    return blocks


def num_heads(model: nn.Module) -> int:
    """`model.config.num_attention_heads`; TypeError when the config has none."""
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise TypeError(f"{type(model).__name__} has no config.num_attention_heads (a DiT seam)")
    return heads


def sequence_hooks_of(model: nn.Module) -> SequenceHooks:
    """The model's `SequenceHooks` module (`sequence_hooks`)."""
    name = _declared(model, "sequence_hooks")
    hooks = getattr(model, name, None)
    if not isinstance(hooks, SequenceHooks):
        raise TypeError(f"{type(model).__name__}.{name} (its `sequence_hooks`) is not a SequenceHooks module")
    return hooks


def set_sequence_hooks(model: nn.Module, hooks: SequenceHooks) -> None:
    """Replace the model's `SequenceHooks` module."""
    sequence_hooks_of(model)  # checks the declaration
    setattr(model, _declared(model, "sequence_hooks"), hooks)


def sequence_attention_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner module, attribute name) of every `sequence_attention` core in every repeated block,
    so a caller can read (`getattr(owner, name)`) or swap (`setattr`) each core."""
    paths = _declared(model, "sequence_attention")
    slots = []
    for i, block in enumerate(blocks_of(model)):
        for path in paths:
            owner_path, _, attr = path.rpartition(".")
            try:
                owner = block.get_submodule(owner_path) if owner_path else block
            except AttributeError as e:
                raise TypeError(f"{type(model).__name__} block {i} has no {path!r} (its `sequence_attention`)") from e
            if not isinstance(getattr(owner, attr, None), nn.Module):
                raise TypeError(f"{type(model).__name__} block {i} has no module at {path!r} (its `sequence_attention`)")
            slots.append((owner, attr))
    return slots


def quant_skip_of(model: nn.Module) -> tuple[str, ...]:
    """The model's `quant_skip` patterns."""
    return tuple(_declared(model, "quant_skip"))


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module name matches a `quant_skip` pattern (whole name or last component)."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in patterns)


def in_fp32_modules(param_name: str, keep_in_fp32: tuple[str, ...]) -> bool:
    """Whether a dotted parameter (or state-dict key) name lies in a module kept float32: one of its
    components is in `keep_in_fp32` (diffusers' rule)."""
    return any(part in keep_in_fp32 for part in param_name.split("."))


def keeps_fp32(model: nn.Module | type, param_name: str) -> bool:
    """Whether a parameter stays float32 in a 16-bit model (`in_fp32_modules` with the class's
    `keep_in_fp32`)."""
    return in_fp32_modules(param_name, _declared(model, "keep_in_fp32"))


def fusions_of(model: nn.Module | type) -> Fusions:
    """The fused-kernel swaps the class declares, else `NO_FUSIONS`. A class declares them as
    `fusions: ClassVar[str] = "package.module:NAME"` (a `Fusions` the family keeps beside its
    model, imported on first use, so the model file need not import the fused modules that
    import it) or as a `fusions()` classmethod."""
    cls = model if isinstance(model, type) else type(model)
    declare = getattr(cls, "fusions", None)
    if isinstance(declare, str):
        module, name = declare.split(":")
        return getattr(importlib.import_module(module), name)
    return declare() if callable(declare) else NO_FUSIONS

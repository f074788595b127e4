"""Model families: registry family name (`ModelSpec.family`) -> the component loaders.

A family knows how to recognise its checkpoints (`detect_spec`) and how to load each component
from either layout. Adding a family = writing its loader module and one line in `_BUILTIN`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from engine.loading import Checkpoint, Layout
    from engine.options import EngineOptions
    from engine.registry import ModelSpec


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, text_len, text_dim), zero-padded after each prompt's valid tokens."""
        ...


class ImageEncoder(Protocol):
    def encode(self, images: list) -> torch.Tensor:
        """(B, tokens, dim) image tokens for the DiT's cross-attention (257 x 1280 for Wan2.1)."""
        ...


class ModelFamily(Protocol):
    name: str

    def detect_spec(self, path: str, layout: "Layout", spec_name: str | None = None) -> "ModelSpec | None":
        """The variant held by a checkpoint folder, or None if the folder is not of this family."""
        ...

    def load_text_encoder(self, ckpt: "Checkpoint", options: "EngineOptions") -> TextEncoder: ...

    def load_image_encoder(self, ckpt: "Checkpoint", options: "EngineOptions") -> ImageEncoder: ...

    def load_transformer(self, ckpt: "Checkpoint", options: "EngineOptions") -> nn.Module: ...

    def load_vae(self, ckpt: "Checkpoint", options: "EngineOptions") -> nn.Module: ...


# family name -> "module:attribute" of a ModelFamily instance (imported on first use)
_BUILTIN: dict[str, str] = {
    "wan2.1": "engine.models.wan.loader:WAN21",
}
_FAMILIES: dict[str, ModelFamily] = {}


def list_families() -> list[str]:
    return sorted(_BUILTIN)


def get_family(name: str) -> ModelFamily:
    """The family registered under `name` (the `family` field of a ModelSpec)."""
    if name not in _FAMILIES:
        if name not in _BUILTIN:
            raise KeyError(f"unknown model family {name!r}; known families: {', '.join(list_families())}")
        module_name, attr = _BUILTIN[name].split(":")
        _FAMILIES[name] = getattr(importlib.import_module(module_name), attr)
    return _FAMILIES[name]


def detect_spec(path: str, layout: "Layout", spec_name: str | None = None) -> "ModelSpec":
    """Ask every family whether it recognises the folder; the first that does names the variant."""
    for name in list_families():
        spec = get_family(name).detect_spec(path, layout, spec_name)
        if spec is not None:
            return spec
    raise ValueError(
        f"{path} ({layout} layout) is not recognised by any model family "
        f"({', '.join(list_families())}): its config matches none of them"
    )

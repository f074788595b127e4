"""Model registry: one entry per model variant. Adding a model = adding an entry + its files.

No other file branches on a model name: callers look a spec up here and use what it names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

Task = Literal["t2v", "i2v", "t2i"]


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-model defaults used where a request leaves a field unset."""

    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    shift: float
    sampler: str
    fps: int
    negative_prompt: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One model variant."""

    name: str
    """Registry name, e.g. "wan2.1-t2v-14b"."""
    family: str
    """Architecture family, e.g. "wan2.1" (selects the component builders)."""
    tasks: frozenset[Task]
    """What the checkpoint can do: {"t2v"}, {"i2v"}, or both for tiny-wan."""
    defaults: SamplingDefaults
    """Default sampling settings."""
    spatial_stride: int = 16
    """Pixel size must be a multiple of this (VAE stride x patch size)."""
    temporal_stride: int = 4
    """Frame count must be temporal_stride * k + 1."""
    max_prompt_chars: int = 8192
    """Longest prompt accepted (characters)."""
    text_len: int = 512
    """Text tokens per prompt (padded)."""
    source: str | None = None
    """Where the weights come from when the name alone is given: a local directory, or None for
    generated models (see `materialize`)."""
    materialize: Callable[[], str] | None = field(default=None, compare=False)
    """For generated (tiny, random-weight) models: writes the checkpoint into a cache dir once and
    returns its path. None for real models."""
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def list_specs() -> list[ModelSpec]:
    _ensure_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _ensure_builtin() -> None:
    # The built-in entries live beside their model files; importing registers them once.
    from engine.models.wan import specs  # noqa: F401

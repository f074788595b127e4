"""Model registry: one entry per model variant. Adding a model = adding an entry + its files.

No other file branches on a model name: callers look a spec up here and use what it names. The
registry imports no model: each family module registers its entries when `engine.families` loads
it (`get_spec` / `list_specs` ask it to load the built-in families first).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable, Literal

from engine.samplers.schedule import DynamicShift

Task = Literal["t2v", "i2v", "t2i", "edit"]
Modality = Literal["video", "image"]
Guidance = Literal["cfg", "cfg_renorm", "none"]
"""How a model is guided: "cfg" = classifier-free guidance (off per request when guidance_scale
<= 1); "cfg_renorm" = the same, then each latent token's guided velocity rescaled to the norm of
its conditional one (Qwen-Image's true CFG: engine.guidance.combine_renorm); "none" = never
(guidance-distilled models: one forward per step)."""


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
    guidance_scale_2: float | None = None
    """Guidance of the second (low-noise) expert; None = the same as guidance_scale."""
    timesteps: tuple[float, ...] | None = None
    """Fixed training timesteps of a step-distilled model (e.g. (1000, 750, 500, 250)); None =
    `steps` spaced timesteps."""
    dynamic_shift: DynamicShift | None = None
    """Resolution-dependent shift (replaces `shift` when a request leaves shift unset)."""
    shift_terminal: float | None = None
    """Stretch the shifted sigmas so the last equals this (engine.samplers), or None."""
    spacing: str = "scheduler"
    """The unshifted sigmas the model's pipeline uses (engine.samplers.SPACINGS)."""
    image_size: Callable[[int, int], tuple[int, int]] | None = field(default=None, compare=False)
    """Image models taking input images: (width, height) of the last input image -> (height,
    width) of the output when the request gives no size (Qwen-Image-Edit: that image's aspect
    ratio at one megapixel). None: the defaults' size."""


@dataclass(frozen=True)
class LatentGeometry:
    """How pixels map to the DiT's latents: (C, F_lat, H_lat, W_lat) with
    F_lat = (F - 1) // temporal + 1, H_lat = H // spatial, W_lat = W // spatial."""

    channels: int = 16
    """Latent channels of the VAE (Wan2.1: 16, Wan2.2 TI2V: 48)."""
    temporal: int = 4
    """VAE temporal compression: frame counts are temporal * k + 1."""
    spatial: int = 8
    """VAE spatial compression (pixels per latent)."""
    patch: int = 2
    """DiT spatial patch size: pixel sizes are multiples of spatial * patch."""

    @property
    def pixel_multiple(self) -> int:
        return self.spatial * self.patch


@dataclass(frozen=True)
class Expert:
    """One DiT of a model and the timesteps it serves (Wan2.2 A14B: two experts)."""

    name: str
    """Component name, e.g. "transformer", "transformer_2" (diffusers' folder names)."""
    role: str = "main"
    """What users call it ("high_noise", "low_noise"), e.g. for per-expert LoRA."""


SINGLE_EXPERT = (Expert("transformer"),)


@dataclass(frozen=True)
class ModelSpec:
    """One model variant."""

    name: str
    """Registry name, e.g. "wan2.1-t2v-14b"."""
    family: str
    """Architecture family, e.g. "wan" (selects the component builders)."""
    tasks: frozenset[Task]
    """What the checkpoint can do: {"t2v"}, {"i2v"}, or both (Wan2.2 TI2V-5B, tiny models)."""
    defaults: SamplingDefaults
    """Default sampling settings (for a diffusers-layout checkpoint, its scheduler config's solver
    and shift replace these when it is resolved: engine.checkpoint.resolve_checkpoint)."""
    modality: Modality = "video"
    """What the model outputs."""
    latent: LatentGeometry = field(default_factory=LatentGeometry)
    experts: tuple[Expert, ...] = SINGLE_EXPERT
    """The DiTs, the high-noise one first."""
    boundary_ratio: float | None = None
    """Two experts: the first serves timesteps >= boundary_ratio * 1000, the second the rest."""
    guidance: Guidance = "cfg"
    max_images: int = 1
    """Most input images a request may give (image-conditioned tasks; Qwen-Image-Edit-2509/2511: 3)."""
    text_reads_images: bool = False
    """The text encoder conditions the prompt on the input images too (a vision-language encoder:
    Qwen-Image-Edit), so the service sends them to it."""
    max_prompt_chars: int = 8192
    """Longest prompt accepted (characters)."""
    text_len: int = 512
    """Text tokens per prompt (padded)."""
    aliases: tuple[str, ...] = ()
    """Other names people use for this entry (matched case-insensitively)."""
    source: str | None = None
    """Where the weights come from when the name alone is given: a local directory, or None for
    generated models (see `materialize`)."""
    materialize: Callable[[], str] | None = field(default=None, compare=False)
    """For generated (tiny, random-weight) models: writes the checkpoint into a cache dir once and
    returns its path. None for real models."""
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.experts) > 1 and self.boundary_ratio is None:
            raise ValueError(f"{self.name}: a model with several experts needs boundary_ratio")
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(f"{self.name}: boundary_ratio must be in (0, 1), got {self.boundary_ratio}")

    @property
    def spatial_stride(self) -> int:
        """Pixel sizes must be multiples of this (VAE stride x patch size)."""
        return self.latent.pixel_multiple

    @property
    def temporal_stride(self) -> int:
        """Frame counts must be temporal_stride * k + 1."""
        return self.latent.temporal

    def with_defaults(self, **changes) -> "ModelSpec":
        """A copy whose defaults have some fields changed (e.g. from a checkpoint's scheduler config);
        the spec itself when nothing changes."""
        if all(getattr(self.defaults, k) == v for k, v in changes.items()):
            return self
        return dataclasses.replace(self, defaults=dataclasses.replace(self.defaults, **changes))


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The entry named `name` (exact registry name)."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def list_specs() -> list[ModelSpec]:
    _ensure_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _ensure_builtin() -> None:
    # The built-in entries live beside their model files; engine.families imports each family
    # module once, which registers its entries here.
    importlib.import_module("engine.families").load_builtin_families()

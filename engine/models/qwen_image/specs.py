"""Registry entries of the Qwen-Image family, and the checkpoint shape each expects.

Every Qwen-Image release is a diffusers folder (Qwen/Qwen-Image, -2512, Qwen/Qwen-Image-Edit,
-2509, -2511). Which entry a folder holds is read from the folder (`QwenVariant`): the pipeline
named by model_index.json's `_class_name` (how the prompt and images are conditioned), the DiT's
`zero_cond_t` (Edit-2511) and the DiT's width and depth (the tiny models). Entries sharing a
variant (Qwen-Image and Qwen-Image-2512) are listed with the default first.

The conditioning conventions of each pipeline are in pipelines.py. Sampling defaults: 50 steps
and true CFG 4 with the negative prompt " " (the Qwen-Image model cards' examples; Edit-2511's
card: 40 steps); the schedule comes from the checkpoint's scheduler config (engine.checkpoint):
Euler, dynamic shift (mu from the image token count), shift_terminal 0.02, the linear sigmas the
pipelines pass. The defaults below are the same values, for folders without one.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.models.qwen_image.pipelines import (
    EDIT_PIPELINE, EDIT_PLUS_PIPELINE, PIPELINES, QWEN_NEGATIVE_PROMPT, REFERENCE_AREA, T2I_PIPELINE, QwenPipeline,
    area_dimensions,
)
from engine.registry import LatentGeometry, ModelSpec, SamplingDefaults, register
from engine.samplers.schedule import DynamicShift

FAMILY = "qwen_image"


def edit_output_size(width: int, height: int) -> tuple[int, int]:
    """(height, width) of an edit without a size: the last input image's aspect ratio at one
    megapixel, rounded down to 16 (the pipelines' default)."""
    w, h = area_dimensions(REFERENCE_AREA, width / height)
    return h // 16 * 16, w // 16 * 16


@dataclass(frozen=True)
class QwenArch:
    """What tells Qwen-Image DiTs apart (read from the DiT config)."""

    dim: int
    num_layers: int
    joint_attention_dim: int

    @classmethod
    def of(cls, config) -> "QwenArch":
        """From a `QwenImageDiTConfig`."""
        return cls(config.inner_dim, config.num_layers, config.joint_attention_dim)


@dataclass(frozen=True)
class QwenVariant:
    """A checkpoint's shape: its DiT, its pipeline, and whether references are at timestep 0."""

    arch: QwenArch
    pipeline: str
    zero_cond_t: bool = False
    reference_area: int = REFERENCE_AREA
    """Pixels of each VAE-encoded reference image of an edit model (the pipelines: one megapixel;
    the tiny models: `TINY_AREAS`, so that they run in seconds on a CPU)."""
    vl_area: int | None = None
    """Pixels of each image the Edit-Plus text encoder sees; None: the pipeline's (384 x 384)."""

    @property
    def conventions(self) -> QwenPipeline:
        return PIPELINES[self.pipeline]


QWEN_LATENT = LatentGeometry(channels=16, temporal=4, spatial=8, patch=2)
"""The Wan2.1 VAE on one frame (8x spatial), 2x2 packed tokens: sizes are multiples of 16."""

REAL_ARCH = QwenArch(dim=3072, num_layers=60, joint_attention_dim=3584)
TINY_ARCH = QwenArch(dim=64, num_layers=2, joint_attention_dim=32)
TINY_REFERENCE_AREA = 128 * 128
TINY_VL_AREA = 64 * 64
TINY_AREAS = dict(reference_area=TINY_REFERENCE_AREA, vl_area=TINY_VL_AREA)
"""The image areas of the tiny models (a variant of the tiny DiT size has them)."""

SCHEDULE = dict(sampler="euler", shift=1.0, shift_terminal=0.02, spacing="linear",
                dynamic_shift=DynamicShift(base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                           max_image_seq_len=8192, time_shift_type="exponential"))
"""The releases' scheduler config, as the pipelines use it (for folders that have none)."""


def _defaults(size: int, steps: int, size_from_image: bool = False) -> SamplingDefaults:
    return SamplingDefaults(
        num_frames=1, height=size, width=size, steps=steps, guidance_scale=4.0, fps=0,
        negative_prompt=QWEN_NEGATIVE_PROMPT, image_size=edit_output_size if size_from_image else None,
        **SCHEDULE)


def _materializer(name: str):
    def materialize() -> str:
        from engine.models.qwen_image.tiny import materialize_tiny

        return materialize_tiny(name)

    return materialize


def _spec(name: str, variant: QwenVariant, defaults: SamplingDefaults, description: str,
          aliases: tuple[str, ...] = (), tiny: bool = False) -> tuple[ModelSpec, QwenVariant]:
    conventions = variant.conventions
    return ModelSpec(
        name=name, family=FAMILY, tasks=frozenset({"edit"} if conventions.edits else {"t2i"}),
        defaults=defaults, modality="image", latent=QWEN_LATENT, guidance="cfg_renorm",
        max_images=max(conventions.max_images, 1), text_reads_images=conventions.edits, max_prompt_chars=8192,
        text_len=512, aliases=aliases,
        materialize=_materializer(name) if tiny else None, description=description,
    ), variant


SPECS: tuple[tuple[ModelSpec, QwenVariant], ...] = (
    _spec("qwen-image", QwenVariant(REAL_ARCH, T2I_PIPELINE), _defaults(1328, 50),
          "Qwen-Image text-to-image 20B (MMDiT, Qwen2.5-VL-7B text encoder)",
          aliases=("Qwen-Image", "Qwen/Qwen-Image")),
    _spec("qwen-image-2512", QwenVariant(REAL_ARCH, T2I_PIPELINE), _defaults(1328, 50),
          "Qwen-Image-2512 text-to-image 20B (same architecture as Qwen-Image; pick it by name)",
          aliases=("Qwen-Image-2512", "Qwen/Qwen-Image-2512")),
    _spec("qwen-image-edit", QwenVariant(REAL_ARCH, EDIT_PIPELINE), _defaults(1024, 50, size_from_image=True),
          "Qwen-Image-Edit 20B: one input image",
          aliases=("Qwen-Image-Edit", "Qwen/Qwen-Image-Edit")),
    _spec("qwen-image-edit-2509", QwenVariant(REAL_ARCH, EDIT_PLUS_PIPELINE), _defaults(1024, 50, size_from_image=True),
          "Qwen-Image-Edit-2509 20B: 1 to 3 input images",
          aliases=("Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2509")),
    _spec("qwen-image-edit-2511", QwenVariant(REAL_ARCH, EDIT_PLUS_PIPELINE, zero_cond_t=True),
          _defaults(1024, 40, size_from_image=True),
          "Qwen-Image-Edit-2511 20B: 1 to 3 input images, references at timestep 0",
          aliases=("Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Edit-2511")),
    _spec("tiny-qwen-image", QwenVariant(TINY_ARCH, T2I_PIPELINE, **TINY_AREAS),
          _defaults(64, 4),
          "Tiny random-weight Qwen-Image (generated locally; its images are noise)", tiny=True),
    _spec("tiny-qwen-image-edit", QwenVariant(TINY_ARCH, EDIT_PLUS_PIPELINE, zero_cond_t=True, **TINY_AREAS),
          _defaults(64, 4),  # 64x64 without a size, unlike the real ones (1 MP)
          "Tiny random-weight Qwen-Image-Edit-2511 (generated locally; its images are noise)", tiny=True),
)

VARIANTS: dict[str, QwenVariant] = {spec.name: variant for spec, variant in SPECS}

for _spec_entry, _ in SPECS:
    register(_spec_entry)

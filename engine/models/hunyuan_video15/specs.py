"""Registry entries of the HunyuanVideo-1.5 family, with the checkpoint shape each expects.

Defaults are the official repository's (`hyvideo/commons/__init__.py` PIPELINE_CONFIGS, README
table) and diffusers' conversion script (`SCHEDULER_CONFIGS`, `GUIDANCE_CONFIGS`): 121 frames at
24 fps, 50 Euler steps on the shifted `linspace(1, 0, n + 1)[:-1]` sigmas, classifier-free
guidance 6; shift 5 (480p), 9 (720p T2V), 7 (720p I2V). CFG-distilled releases: guidance 1 (no
negative branch), the same shifts and 50 steps. The 480p I2V step-distilled release (MeanFlow):
guidance 1, shift 7, 12 steps (8 also recommended). A diffusers-layout folder samples with its own
scheduler (shift) and guider (guidance scale) configs instead. Sizes: text-to-video defaults to
the 16:9 bucket of the resolution (480x848, 720x1280); image-to-video without a size takes the
bucket diffusers picks for the image (`adapter.bucket_size`).

A folder's variant (`Variant`) is its DiT architecture (`Arch`, from the DiT config), its size
buckets (`target_size`: 640 = 480p, 960 = 720p), the task its pipeline runs and how it was
distilled; in the official release layout the DiT sub-folder (`transformer/<official_dir>/`,
the release's own variant names) says the last three.

Not registered: the super-resolution releases (720p/1080p_sr_distilled: an upsampler stage this
engine does not have) and the sparse-attention 720p release (SSTA attention, trained for it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from engine.models.hunyuan_video15.adapter import bucket_size
from engine.registry import LatentGeometry, ModelSpec, SamplingDefaults, register

FAMILY = "hunyuanvideo-1.5"
LATENT = LatentGeometry(channels=32, temporal=4, spatial=16, patch=1)
"""32 latent channels, 16x spatial and 4x temporal compression, patch 1x1x1."""
OFFICIAL_REPO = "tencent/HunyuanVideo-1.5"
COMMUNITY = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{}"
"""The diffusers-layout conversions on the Hub (one repo per release variant)."""

Distill = Literal["none", "cfg", "step"]
"""How a release was distilled: not at all, guidance (CFG-distilled: one forward per step), or
steps (MeanFlow: few steps, also without guidance)."""


@dataclass(frozen=True)
class Arch:
    """What tells HunyuanVideo-1.5 DiT architectures apart (read from the DiT config)."""

    inner_dim: int
    num_layers: int
    in_channels: int
    use_meanflow: bool

    @classmethod
    def of(cls, config) -> "Arch":
        """From a `HunyuanVideo15DiTConfig`."""
        return cls(config.inner_dim, config.num_layers, config.in_channels, config.use_meanflow)


@dataclass(frozen=True)
class Variant:
    arch: Arch
    target_size: int
    """Bucket base size in pixels (640 = 480p, 960 = 720p)."""
    task: Literal["t2v", "i2v"]
    """The pipeline it runs (diffusers: HunyuanVideo15Pipeline / ...ImageToVideoPipeline)."""
    distill: Distill = "none"
    official_dir: str | None = None
    """Its DiT folder in the official release (`transformer/<official_dir>/`)."""


REAL = Arch(inner_dim=2048, num_layers=54, in_channels=65, use_meanflow=False)
REAL_MEANFLOW = Arch(inner_dim=2048, num_layers=54, in_channels=65, use_meanflow=True)
TINY = Arch(inner_dim=64, num_layers=2, in_channels=65, use_meanflow=False)
"""The built-in tiny model (sizes in tiny.py)."""
TINY_TARGET_SIZE = 64
"""The tiny model's size buckets: about 64 x 64 pixels (48 x 80 for 16:9)."""


def image_bucket(width: int, height: int, target_size: int) -> tuple[int, int]:
    """`SamplingDefaults.image_size` of an image-to-video entry: (height, width) of the bucket
    diffusers picks for an input image of width x height (adapter.bucket_size)."""
    return bucket_size(height, width, target_size)


def _defaults(target_size: int, guidance: float, shift: float, steps: int = 50, frames: int = 121,
              fps: int = 24) -> SamplingDefaults:
    height, width = bucket_size(9, 16, target_size)   # diffusers' text-to-video default (16:9)
    return SamplingDefaults(num_frames=frames, height=height, width=width, steps=steps, guidance_scale=guidance,
                            shift=shift, sampler="euler", fps=fps, negative_prompt="", spacing="linear_to_zero",
                            image_size=functools.partial(image_bucket, target_size=target_size))


def _spec(name: str, variant: Variant, tasks: set[str], defaults: SamplingDefaults, description: str,
          aliases: tuple[str, ...] = (), **extra) -> tuple[ModelSpec, Variant]:
    return ModelSpec(
        name=name, family=FAMILY, tasks=frozenset(tasks), defaults=defaults, latent=LATENT,
        guidance="none" if variant.distill != "none" else "cfg", text_len=1000, aliases=aliases,
        description=description, **extra,
    ), variant


def _release(name: str, version: str, target: int, task: str, distill: Distill, guidance: float,
             shift: float, steps: int = 50, names: tuple[str, ...] = (), repos: tuple[str, ...] = (),
             what: str = "") -> tuple[ModelSpec, Variant]:
    """An official release variant: `transformer/<version>/` in the release, COMMUNITY.format(version)
    on the Hub in the diffusers layout (the preferred download: one variant), then `repos`."""
    arch = REAL_MEANFLOW if distill == "step" else REAL
    return _spec(f"{FAMILY}-{name}", Variant(arch, target, task, distill, version), {task},
                 _defaults(target, guidance, shift, steps),
                 f"HunyuanVideo-1.5 {what} (8.3B DiT, Qwen2.5-VL + ByT5 text encoders)",
                 aliases=(*names, f"{FAMILY}-{version}", COMMUNITY.format(version), *repos))


def _tiny_materializer():
    from engine.models.hunyuan_video15.tiny import materialize_tiny

    return materialize_tiny()


SPECS: tuple[tuple[ModelSpec, Variant], ...] = (
    _release("480p-t2v", "480p_t2v", 640, "t2v", "none", 6.0, 5.0, names=("HunyuanVideo-1.5",), repos=(OFFICIAL_REPO,),
             what="text-to-video, 480p"),
    _release("480p-i2v", "480p_i2v", 640, "i2v", "none", 6.0, 5.0, what="image-to-video, 480p"),
    _release("720p-t2v", "720p_t2v", 960, "t2v", "none", 6.0, 9.0, what="text-to-video, 720p"),
    _release("720p-i2v", "720p_i2v", 960, "i2v", "none", 6.0, 7.0, what="image-to-video, 720p"),
    _release("480p-t2v-cfg-distilled", "480p_t2v_distilled", 640, "t2v", "cfg", 1.0, 5.0,
             what="text-to-video, 480p, CFG-distilled"),
    _release("480p-i2v-cfg-distilled", "480p_i2v_distilled", 640, "i2v", "cfg", 1.0, 5.0,
             what="image-to-video, 480p, CFG-distilled"),
    _release("720p-i2v-cfg-distilled", "720p_i2v_distilled", 960, "i2v", "cfg", 1.0, 7.0,
             what="image-to-video, 720p, CFG-distilled"),
    _release("480p-i2v-step-distilled", "480p_i2v_step_distilled", 640, "i2v", "step", 1.0, 7.0, steps=12,
             what="image-to-video, 480p, step-distilled (MeanFlow; 8 or 12 steps)"),
    _spec("tiny-hunyuanvideo-1.5", Variant(TINY, TINY_TARGET_SIZE, "i2v", "none", "480p_i2v"), {"t2v", "i2v"},
          _defaults(TINY_TARGET_SIZE, 6.0, 5.0, steps=4, frames=9, fps=8),
          "Tiny random-weight HunyuanVideo-1.5 (generated locally; its videos are noise)",
          materialize=_tiny_materializer),
)

VARIANTS: dict[str, Variant] = {spec.name: variant for spec, variant in SPECS}

for _spec_entry, _ in SPECS:
    register(_spec_entry)

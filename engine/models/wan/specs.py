"""Registry entries of the Wan2.1 family, with the DiT architecture each one expects.

A checkpoint folder's variant is found by comparing its DiT config with `WanArch` of each entry
(never by the folder's name). Entries sharing an architecture (I2V 480p / 720p) are listed with
the default first.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.registry import ModelSpec, SamplingDefaults, register

FAMILY = "wan2.1"

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""The official Wan2.1 default negative prompt (`wan/configs/shared_config.py`)."""


@dataclass(frozen=True)
class WanArch:
    """What tells Wan DiT variants apart (all read from the DiT config)."""

    dim: int
    num_layers: int
    ffn_dim: int
    in_channels: int
    image_dim: int | None

    @classmethod
    def of(cls, config) -> "WanArch":
        """From a `WanDiTConfig` (diffusers field names)."""
        return cls(
            dim=config.num_attention_heads * config.attention_head_dim,
            num_layers=config.num_layers,
            ffn_dim=config.ffn_dim,
            in_channels=config.in_channels,
            image_dim=config.image_dim,
        )

    @property
    def tasks(self) -> frozenset:
        """I2V DiTs take 36 input channels (16 noisy + 4 mask + 16 image latents)."""
        return frozenset({"i2v"}) if self.in_channels == 36 else frozenset({"t2v"})


def _defaults(frames: int, height: int, width: int, steps: int, shift: float) -> SamplingDefaults:
    return SamplingDefaults(
        num_frames=frames, height=height, width=width, steps=steps, guidance_scale=5.0, shift=shift,
        sampler="unipc", fps=16, negative_prompt=WAN_NEGATIVE_PROMPT,
    )


T2V_DEFAULTS = _defaults(81, 480, 832, 50, 5.0)
"""Family defaults for a T2V checkpoint that matches no entry."""
I2V_DEFAULTS = _defaults(81, 480, 832, 40, 3.0)
"""Family defaults for an I2V checkpoint that matches no entry."""

T2V_1_3B = WanArch(dim=1536, num_layers=30, ffn_dim=8960, in_channels=16, image_dim=None)
T2V_14B = WanArch(dim=5120, num_layers=40, ffn_dim=13824, in_channels=16, image_dim=None)
I2V_14B = WanArch(dim=5120, num_layers=40, ffn_dim=13824, in_channels=36, image_dim=1280)


# Tiny random-weight model: DiT 2 layers x 32 wide, 36 input channels with CLIP tokens (T2V+I2V),
# tiny VAE (stride 4x8x8), tiny umT5 and CLIP. Sizes are in tiny.py.
TINY_ARCH = WanArch(dim=32, num_layers=2, ffn_dim=64, in_channels=36, image_dim=32)


def _materialize_tiny() -> str:
    from engine.models.wan.tiny import materialize_tiny_wan

    return materialize_tiny_wan()


SPECS: tuple[tuple[ModelSpec, WanArch], ...] = (
    (ModelSpec(
        name="wan2.1-t2v-1.3b", family=FAMILY, tasks=frozenset({"t2v"}),
        defaults=T2V_DEFAULTS,
        description="Wan2.1 text-to-video 1.3B (480p)",
    ), T2V_1_3B),
    (ModelSpec(
        name="wan2.1-t2v-14b", family=FAMILY, tasks=frozenset({"t2v"}),
        defaults=_defaults(81, 720, 1280, 50, 5.0),
        description="Wan2.1 text-to-video 14B (480p and 720p)",
    ), T2V_14B),
    (ModelSpec(
        name="wan2.1-i2v-14b-480p", family=FAMILY, tasks=frozenset({"i2v"}),
        defaults=I2V_DEFAULTS,
        description="Wan2.1 image-to-video 14B, 480p",
    ), I2V_14B),
    (ModelSpec(
        name="wan2.1-i2v-14b-720p", family=FAMILY, tasks=frozenset({"i2v"}),
        defaults=_defaults(81, 720, 1280, 40, 5.0),
        description="Wan2.1 image-to-video 14B, 720p (same weights layout as 480p; pick it by name)",
    ), I2V_14B),
    (ModelSpec(
        name="tiny-wan", family=FAMILY, tasks=frozenset({"t2v", "i2v"}),
        defaults=SamplingDefaults(
            num_frames=9, height=64, width=64, steps=4, guidance_scale=5.0, shift=3.0,
            sampler="unipc", fps=8, negative_prompt="",
        ),
        materialize=_materialize_tiny,
        description="Tiny random-weight Wan (generated locally; for tests and CPU demos)",
    ), TINY_ARCH),
)

for _spec, _ in SPECS:
    register(_spec)

"""Registry entries of the Wan family (Wan2.1 and Wan2.2), with the checkpoint shape each expects.

A checkpoint folder's variant is found by comparing its DiT config and structure (`WanVariant`:
architecture, number of experts, per-token timesteps) with each entry's (never by the folder's
name). Entries sharing a variant (Wan2.1 I2V 480p / 720p) are listed with the default first.

Defaults are the official repository's (`wan/configs`, `generate.py`); for a diffusers-layout
checkpoint the solver and shift of its own `scheduler/scheduler_config.json` replace them when it
is resolved (engine.loading), as diffusers' pipelines sample.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.registry import Expert, LatentGeometry, ModelSpec, SamplingDefaults, register

FAMILY = "wan"

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""The official Wan default negative prompt (`wan/configs/shared_config.py`, same in Wan2.2)."""

TWO_EXPERTS = (Expert("transformer", "high_noise"), Expert("transformer_2", "low_noise"))
"""Wan2.2 A14B: diffusers' `transformer` / `transformer_2` = the official `high_noise_model` /
`low_noise_model`."""

WAN21_LATENT = LatentGeometry(channels=16, temporal=4, spatial=8, patch=2)
WAN22_LATENT = LatentGeometry(channels=48, temporal=4, spatial=16, patch=2)
"""Wan2.2 VAE (TI2V-5B): 48 channels, 16x spatial compression."""


@dataclass(frozen=True)
class WanArch:
    """What tells Wan DiT architectures apart (all read from the DiT config)."""

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


@dataclass(frozen=True)
class WanVariant:
    """A checkpoint's shape: its DiT architecture, how many experts, and how images condition it."""

    arch: WanArch
    experts: int = 1
    expand_timesteps: bool = False
    """Per-token timesteps; an image replaces latent frame 0 (Wan2.2 TI2V-5B). Otherwise an image
    enters as mask + latent channels concatenated to the noise (36 input channels)."""

    @property
    def tasks(self) -> frozenset:
        if self.expand_timesteps:
            return frozenset({"t2v", "i2v"})
        return frozenset({"i2v"}) if self.arch.in_channels > self.latent.channels else frozenset({"t2v"})

    @property
    def latent(self) -> LatentGeometry:
        return WAN22_LATENT if self.arch.in_channels == WAN22_LATENT.channels else WAN21_LATENT


def _defaults(frames: int, height: int, width: int, steps: int, shift: float, guidance: float = 5.0,
              guidance_2: float | None = None, fps: int = 16) -> SamplingDefaults:
    return SamplingDefaults(
        num_frames=frames, height=height, width=width, steps=steps, guidance_scale=guidance, shift=shift,
        sampler="unipc", fps=fps, negative_prompt=WAN_NEGATIVE_PROMPT, guidance_scale_2=guidance_2,
    )


T2V_DEFAULTS = _defaults(81, 480, 832, 50, 5.0)
"""Family defaults for a T2V checkpoint that matches no entry."""
I2V_DEFAULTS = _defaults(81, 480, 832, 40, 3.0)
"""Family defaults for an I2V checkpoint that matches no entry."""

T2V_1_3B = WanArch(dim=1536, num_layers=30, ffn_dim=8960, in_channels=16, image_dim=None)
T2V_14B = WanArch(dim=5120, num_layers=40, ffn_dim=13824, in_channels=16, image_dim=None)
I2V_14B = WanArch(dim=5120, num_layers=40, ffn_dim=13824, in_channels=36, image_dim=1280)
I2V_A14B = WanArch(dim=5120, num_layers=40, ffn_dim=13824, in_channels=36, image_dim=None)
TI2V_5B = WanArch(dim=3072, num_layers=30, ffn_dim=14336, in_channels=48, image_dim=None)

# Tiny random-weight models (sizes in tiny.py): tiny-wan's DiT takes 36 input channels with CLIP
# tokens (T2V + I2V); tiny-wan2.2-a14b has two such experts without CLIP (as the A14B I2V);
# tiny-wan2.2-ti2v has 48 channels and per-token timesteps with a tiny Wan2.2 VAE.
TINY_ARCH = WanArch(dim=32, num_layers=2, ffn_dim=64, in_channels=36, image_dim=32)
TINY_A14B_ARCH = WanArch(dim=32, num_layers=2, ffn_dim=64, in_channels=36, image_dim=None)
TINY_TI2V_ARCH = WanArch(dim=32, num_layers=2, ffn_dim=64, in_channels=48, image_dim=None)


def _materializer(name: str):
    def materialize() -> str:
        from engine.models.wan.tiny import materialize_tiny

        return materialize_tiny(name)

    return materialize


def _tiny_defaults(num_frames: int = 9, size: int = 64, guidance_2: float | None = None) -> SamplingDefaults:
    return SamplingDefaults(num_frames=num_frames, height=size, width=size, steps=4, guidance_scale=5.0,
                            shift=3.0, sampler="unipc", fps=8, negative_prompt="", guidance_scale_2=guidance_2)


DISTILL_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
"""The 4 training timesteps of the step-distilled Wan models (LightX2V's `denoising_step_list`,
Wan2.2-Lightning's `linspace(1000, 0, 5)[:-1]`), shifted by 5: sigmas 1, 0.9375, 0.833, 0.625."""


def _distill_defaults(height: int, width: int) -> SamplingDefaults:
    """4 fixed steps, shift 5, Euler without fresh noise, no classifier-free guidance (LightX2V
    `configs/distill/*`, Wan2.2-Lightning)."""
    return SamplingDefaults(num_frames=81, height=height, width=width, steps=4, guidance_scale=1.0, shift=5.0,
                            sampler="euler", fps=16, negative_prompt="", guidance_scale_2=1.0,
                            timesteps=DISTILL_TIMESTEPS)


SPECS: tuple[tuple[ModelSpec, WanVariant], ...] = (
    (ModelSpec(
        name="wan2.1-t2v-1.3b", family=FAMILY, tasks=frozenset({"t2v"}), defaults=T2V_DEFAULTS,
        aliases=("Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
        description="Wan2.1 text-to-video 1.3B (480p)",
    ), WanVariant(T2V_1_3B)),
    (ModelSpec(
        name="wan2.1-t2v-14b", family=FAMILY, tasks=frozenset({"t2v"}),
        defaults=_defaults(81, 720, 1280, 50, 5.0),
        aliases=("Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
        description="Wan2.1 text-to-video 14B (480p and 720p)",
    ), WanVariant(T2V_14B)),
    (ModelSpec(
        name="wan2.1-i2v-14b-480p", family=FAMILY, tasks=frozenset({"i2v"}), defaults=I2V_DEFAULTS,
        aliases=("Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
        description="Wan2.1 image-to-video 14B, 480p",
    ), WanVariant(I2V_14B)),
    (ModelSpec(
        name="wan2.1-i2v-14b-720p", family=FAMILY, tasks=frozenset({"i2v"}),
        defaults=_defaults(81, 720, 1280, 40, 5.0),
        aliases=("Wan2.1-I2V-14B-720P", "Wan-AI/Wan2.1-I2V-14B-720P", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"),
        description="Wan2.1 image-to-video 14B, 720p (same weights layout as 480p; pick it by name)",
    ), WanVariant(I2V_14B)),
    (ModelSpec(
        name="wan2.2-t2v-a14b", family=FAMILY, tasks=frozenset({"t2v"}),
        defaults=_defaults(81, 720, 1280, 40, 12.0, guidance=4.0, guidance_2=3.0),
        experts=TWO_EXPERTS, boundary_ratio=0.875,
        aliases=("Wan2.2-T2V-A14B", "Wan-AI/Wan2.2-T2V-A14B", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
        description="Wan2.2 text-to-video A14B: high-noise and low-noise 14B experts (480p and 720p)",
    ), WanVariant(T2V_14B, experts=2)),
    (ModelSpec(
        name="wan2.2-i2v-a14b", family=FAMILY, tasks=frozenset({"i2v"}),
        defaults=_defaults(81, 720, 1280, 40, 5.0, guidance=3.5, guidance_2=3.5),
        experts=TWO_EXPERTS, boundary_ratio=0.9,
        aliases=("Wan2.2-I2V-A14B", "Wan-AI/Wan2.2-I2V-A14B", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),
        description="Wan2.2 image-to-video A14B: two 14B experts, no CLIP (480p and 720p)",
    ), WanVariant(I2V_A14B, experts=2)),
    (ModelSpec(
        name="wan2.2-ti2v-5b", family=FAMILY, tasks=frozenset({"t2v", "i2v"}),
        defaults=_defaults(121, 704, 1280, 50, 5.0, fps=24), latent=WAN22_LATENT,
        aliases=("Wan2.2-TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
        description="Wan2.2 text/image-to-video 5B with the Wan2.2 VAE (720p, 24 fps)",
    ), WanVariant(TI2V_5B, expand_timesteps=True)),
    # Step-distilled (4 steps, no CFG): the same architectures, so a folder is recognised as its
    # base entry; pick these by name (`spec_name=`, or the name / alias as the model). Each takes the
    # full distilled checkpoint, or the base checkpoint plus the distill LoRA (`lora_path=`).
    (ModelSpec(
        name="wan2.1-t2v-14b-distill", family=FAMILY, tasks=frozenset({"t2v"}),
        defaults=_distill_defaults(480, 832), guidance="none",
        aliases=("Wan2.1-T2V-14B-StepDistill-CfgDistill",),
        description="Wan2.1 T2V 14B step- and CFG-distilled (lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-"
                    "Lightx2v, Self-Forcing DMD): 4 steps without "
                    "guidance; the full model (distill_models/distill_model.safetensors) or Wan2.1-T2V-14B "
                    "with lora_path=loras/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors",
    ), WanVariant(T2V_14B)),
    (ModelSpec(
        name="wan2.1-i2v-14b-480p-distill", family=FAMILY, tasks=frozenset({"i2v"}),
        defaults=_distill_defaults(480, 832), guidance="none",
        aliases=("Wan2.1-I2V-14B-480P-StepDistill-CfgDistill",),
        description="Wan2.1 I2V 14B 480p step- and CFG-distilled (LightX2V): 4 steps without guidance; the "
                    "full model or Wan2.1-I2V-14B-480P with "
                    "lora_path=loras/Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors",
    ), WanVariant(I2V_14B)),
    (ModelSpec(
        name="wan2.2-t2v-a14b-lightning", family=FAMILY, tasks=frozenset({"t2v"}),
        defaults=_distill_defaults(480, 832), guidance="none", experts=TWO_EXPERTS, boundary_ratio=0.875,
        aliases=("Wan2.2-T2V-A14B-Lightning",),
        description="Wan2.2 T2V A14B with the Wan2.2-Lightning 4-step LoRAs (lightx2v/Wan2.2-Lightning), one "
                    "per expert (2 steps each): "
                    "lora_path=[high_noise_model.safetensors, low_noise_model.safetensors], "
                    "lora_expert=[high_noise, low_noise]",
    ), WanVariant(T2V_14B, experts=2)),
    (ModelSpec(
        name="wan2.2-i2v-a14b-lightning", family=FAMILY, tasks=frozenset({"i2v"}),
        defaults=_distill_defaults(480, 832), guidance="none", experts=TWO_EXPERTS, boundary_ratio=0.9,
        aliases=("Wan2.2-I2V-A14B-Lightning",),
        description="Wan2.2 I2V A14B with the Wan2.2-Lightning 4-step LoRAs, one per expert (2 steps each)",
    ), WanVariant(I2V_A14B, experts=2)),
    (ModelSpec(
        name="tiny-wan", family=FAMILY, tasks=frozenset({"t2v", "i2v"}), defaults=_tiny_defaults(),
        materialize=_materializer("tiny-wan"),
        description="Tiny random-weight Wan2.1 (generated locally; its videos are noise)",
    ), WanVariant(TINY_ARCH)),
    (ModelSpec(
        name="tiny-wan2.2-a14b", family=FAMILY, tasks=frozenset({"t2v", "i2v"}),
        defaults=_tiny_defaults(guidance_2=3.0), experts=TWO_EXPERTS, boundary_ratio=0.875,
        materialize=_materializer("tiny-wan2.2-a14b"),
        description="Tiny random-weight Wan2.2 with two experts (generated locally; its videos are noise)",
    ), WanVariant(TINY_A14B_ARCH, experts=2)),
    (ModelSpec(
        name="tiny-wan2.2-ti2v", family=FAMILY, tasks=frozenset({"t2v", "i2v"}),
        defaults=_tiny_defaults(size=64), latent=WAN22_LATENT,
        materialize=_materializer("tiny-wan2.2-ti2v"),
        description="Tiny random-weight Wan2.2 TI2V with the Wan2.2 VAE (generated locally; noise)",
    ), WanVariant(TINY_TI2V_ARCH, expand_timesteps=True)),
)

VARIANTS: dict[str, WanVariant] = {spec.name: variant for spec, variant in SPECS}

for _spec, _ in SPECS:
    register(_spec)

from engine.models.wan import caching  # noqa: E402  (the published TeaCache / MagCache calibrations)

caching.register()

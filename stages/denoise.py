"""Denoise stage: initial noise -> the phased sampler loop (engine/denoise.py) -> Latents.

Initial noise (when the request brings none): `torch.randn((C, F_lat, H_lat, W_lat),
generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`, drawn on the CPU so a
seed gives the same video on every device. diffusers' Wan pipelines draw the same numbers for
`generator=torch.Generator("cpu").manual_seed(seed)` (their batch-1 shape has the same count).
Latents stay float32 through the loop; the DiT sees them cast to the engine dtype. How image
conditioning and timesteps enter the DiT is the family adapter's (engine/families.DiTAdapter).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from engine.denoise import CancelFn, ProgressFn, make_phases, run_phases
from engine.guidance import GuidedPredictor
from engine.parallel import guided_predictors
from stages.base import Cancelled, Stage, StageError, expect_finite, expect_shape
from stages.payloads import ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.families import DiTAdapter
    from engine.loading import Checkpoint
    from engine.options import EngineOptions
    from engine.registry import ModelSpec

__all__ = ["CancelFn", "Cancelled", "DenoiseStage", "ProgressFn", "initial_noise"]


def initial_noise(request: ResolvedRequest) -> torch.Tensor:
    """(C, F_lat, H_lat, W_lat) float32 CPU: the request's latents, or seeded Gaussian noise."""
    if request.latents is not None:
        return request.latents.to(torch.float32)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    return torch.randn(request.latent_shape, generator=generator, dtype=torch.float32)


class DenoiseStage(Stage):
    """The sampler loop around the model's DiTs. One instance serves many requests (no
    per-request state)."""

    name = "denoise"
    output_type = Latents

    def __init__(self, dits: Mapping[str, nn.Module], adapter: "DiTAdapter", spec: "ModelSpec",
                 options: "EngineOptions", predictors: Mapping[str, GuidedPredictor] | None = None) -> None:
        missing = [e.name for e in spec.experts if e.name not in dits]
        if missing:
            raise ValueError(f"{spec.name}: DiTs missing for experts {missing} (given: {sorted(dits)})")
        self.dits = dict(dits)
        self.adapter = adapter
        self.spec = spec
        self.options = options
        self.predictors = dict(predictors) if predictors is not None else guided_predictors(self.dits, options)

    @property
    def transformer(self) -> nn.Module:
        """The first (or only) expert's DiT."""
        return self.dits[self.spec.experts[0].name]

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions") -> "DenoiseStage":
        from engine.families import get_family

        family = get_family(ckpt.spec.family)
        return cls(family.load_dits(ckpt, options), family.adapter(ckpt.spec), ckpt.spec, options)

    def forward(self, request: ResolvedRequest, text: TextEmbeds, image: ImageCond | None = None,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> Latents:
        from engine.samplers import make_sampler

        device, dtype = self.options.torch_device, self.options.torch_dtype
        if request.do_cfg and text.negative_context is None:
            raise ValueError("denoise: guidance is on but the text embeddings have no negative_context")

        # 1. Initial noise, float32 on the device; conditioning in the model dtype.
        latents = initial_noise(request).to(device)[None]                    # (1, C, F_lat, H_lat, W_lat)
        context = self.adapter.text_input(text.context, device, dtype)       # Wan: (1, L, D)
        negative = self.adapter.text_input(text.negative_context, device, dtype) if request.do_cfg else None

        # 2. The phased sampler loop (the schedule as the model's pipeline builds it; euler_a draws
        #    its step noise from the request's seed).
        d = self.spec.defaults
        _, f_lat, h_lat, w_lat = request.latent_shape
        patch = self.spec.latent.patch
        sampler = make_sampler(
            request.sampler, request.steps, request.shift, timesteps=request.timesteps,
            dynamic=d.dynamic_shift if request.dynamic_shift else None, shift_terminal=d.shift_terminal,
            spacing=d.spacing, image_seq_len=f_lat * (h_lat // patch) * (w_lat // patch), seed=request.seed)
        phases = make_phases(self.spec, request.guidance_scale, request.guidance_scale_2)
        latents = run_phases(phases, self.predictors, self.dits, self.adapter, sampler, latents, context,
                             negative, image, dtype, progress=progress, should_cancel=should_cancel)
        return Latents(latents=latents[0].cpu())

    def check_output(self, request: ResolvedRequest, out: Latents) -> None:
        expect_shape(self.name, "latents", out.latents, request.latent_shape)
        expect_finite(self.name, "latents", out.latents)
        if out.latents.dtype != torch.float32:
            raise StageError(f"denoise: latents are {out.latents.dtype}, expected float32")

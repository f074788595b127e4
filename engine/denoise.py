"""The denoise loop: one sampler over phases, each phase an expert with its guidance scale.

    phases = make_phases(spec, guidance_scale, guidance_scale_2)
    latents = run_phases(phases, predictors, dits, adapter, sampler, latents, context, negative, image)

A model with one DiT has one phase. Wan2.2 A14B has two: the high-noise expert for timesteps at or
above `boundary_ratio * 1000` and the low-noise expert below, exactly as diffusers decides it (the
comparison `t >= boundary` is made on the float32 timestep tensor, so a timestep equal to the
boundary, e.g. 875 or 900, goes to the high-noise expert). One sampler spans all phases (UniPC's
history crosses the switch, as in diffusers); the switch is decided from the timestep alone, so all
ranks of a parallel group switch at the same step without a collective. With offload ("model" or
"expert") an expert's weights are resident on the device for its phase only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import Tensor, nn

from engine.offload import resident
from engine.samplers.schedule import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from engine.conditioning import ImageCond
    from engine.families import DiTAdapter
    from engine.guidance import GuidedPredictor
    from engine.registry import ModelSpec

ProgressFn = Callable[[int, int], None]
"""progress(step_done, total_steps), called after every denoising step."""
CancelFn = Callable[[], bool]
"""should_cancel(), asked before every step; True stops the loop with `Cancelled`."""


class Cancelled(RuntimeError):
    """The request was cancelled (its `should_cancel()` returned True between two steps)."""


@dataclass(frozen=True)
class Phase:
    """A stretch of the schedule served by one expert."""

    expert: str
    """The DiT's component name (`Expert.name`)."""
    t_min: float
    """The phase serves timesteps t >= t_min (-inf for the last phase)."""
    guidance_scale: float


def make_phases(spec: "ModelSpec", guidance_scale: float, guidance_scale_2: float | None = None
                ) -> tuple[Phase, ...]:
    """The phases of `spec`, highest timesteps first. `guidance_scale_2` (None = guidance_scale)
    is the second expert's scale."""
    experts = spec.experts
    if len(experts) == 1:
        return (Phase(experts[0].name, -math.inf, guidance_scale),)
    if len(experts) != 2:
        raise ValueError(f"{spec.name}: phases are defined for one or two experts, got {len(experts)}")
    boundary = spec.boundary_ratio * NUM_TRAIN_TIMESTEPS  # as diffusers: ratio * num_train_timesteps
    second = guidance_scale if guidance_scale_2 is None else guidance_scale_2
    return (Phase(experts[0].name, boundary, guidance_scale), Phase(experts[1].name, -math.inf, second))


def phase_at(phases: tuple[Phase, ...], t: Tensor) -> Phase:
    """The phase serving timestep `t` (a float32 0-d tensor: compared as diffusers compares)."""
    for phase in phases:
        if phase.t_min == -math.inf or bool(t >= phase.t_min):
            return phase
    raise AssertionError("the last phase has t_min = -inf")


def run_phases(phases: tuple[Phase, ...], predictors: Mapping[str, "GuidedPredictor"],
               dits: Mapping[str, nn.Module], adapter: "DiTAdapter", sampler, latents: Tensor,
               context: Tensor, negative: Tensor | None, image: "ImageCond | None", dtype: torch.dtype,
               progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
               on_step: Callable[[int], None] | None = None) -> Tensor:
    """Runs every step of `sampler`; returns the final latents (1, C, F, H, W) float32.

    latents: (1, C, F_lat, H_lat, W_lat) float32 initial noise on the device. context / negative:
    (1, L, D) in the model dtype (negative None = guidance off). `on_step(i)` is called before
    step i's guided prediction (a request's feature cache: engine/cache.py)."""
    timesteps = sampler.timesteps.to(latents.device, torch.float32)  # (steps,), one copy to the device
    steps = timesteps.shape[0]
    wants_next = getattr(adapter, "uses_next_timestep", False)  # MeanFlow: also the next step's timestep
    current: Phase | None = None
    with contextlib.ExitStack() as stack:
        for i in range(steps):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"request cancelled before step {i + 1} of {steps}")
            # 1. The phase of this timestep; its expert's weights resident on the device.
            t = timesteps[i]
            phase = phase_at(phases, t)
            if phase.expert != (current.expert if current else None):
                stack.close()
                stack.enter_context(resident(dits[phase.expert]))
            current = phase
            # 2. The DiT input from the adapter, the guided velocity, one sampler step.
            dit = dits[phase.expert]
            if on_step is not None:
                on_step(i)
            extra = {"t_next": timesteps[i + 1] if i + 1 < steps else torch.zeros_like(t)} if wants_next else {}
            x, timestep, image_tokens = adapter.model_input(latents, t, image, dit, dtype, **extra)
            velocity = predictors[phase.expert](x, timestep, context, negative, phase.guidance_scale, image_tokens)
            latents = sampler.step(velocity, i, latents).to(torch.float32)
            if progress is not None:
                progress(i + 1, steps)
    return adapter.final_latents(latents, image)

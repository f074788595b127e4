"""Flow-matching samplers, by name: "unipc" (default, as the Wan pipelines), "euler", "euler_a"
(ancestral / stochastic Euler), "dpmpp_2m" (alias "dpmpp2m").

    sampler = make_sampler("unipc", num_steps=50, shift=5.0)
    for i, t in enumerate(sampler.timesteps):
        v = dit(x, t)                  # velocity at noise level sampler.sigmas[i]
        x = sampler.step(v, i, x)

One instance per request: multistep samplers keep the previous steps' predictions, "euler_a" its
noise generator (seeded per request: `make_sampler("euler_a", 30, 5.0, seed=request.seed)`).

Each sampler reproduces a diffusers scheduler: "unipc" UniPCMultistepScheduler, "euler" and "euler_a"
FlowMatchEulerDiscreteScheduler (stochastic_sampling False / True), "dpmpp_2m"
DPMSolverMultistepScheduler (all with flow sigmas). The schedule settings are the model's (from its
scheduler_config.json through `engine.samplers.config.scheduler_defaults`, or the registry's):

    shift            static flow shift
    dynamic          DynamicShift: resolution-dependent shift, mu from `image_seq_len` (Qwen-Image);
                     replaces the static shift, as diffusers' use_dynamic_shifting does
    shift_terminal   stretch the shifted sigmas so the last one equals it (Qwen-Image: 0.02)
    spacing          "scheduler" (the scheduler's own grid, Wan), "linear" (the sigmas the Qwen-Image
                     and Flux pipelines pass), "linear_to_zero" (HunyuanVideo-1.5's)

and each sampler builds the schedule from them as its diffusers scheduler's set_timesteps does.

Step-distilled models run at fixed training timesteps instead of `num_steps` spaced ones:

    make_sampler("euler", 4, shift=5.0, timesteps=[1000, 750, 500, 250])

gives sigma_i = shift(t_i / 1000) = [1, 0.9375, 0.833, 0.625] then 0, and the DiT sees 1000 * sigma_i
(LightX2V's step-distill schedule, with a deterministic Euler update). `timesteps` works with every
sampler; `num_steps` must equal its length; it takes no dynamic shift, shift_terminal or spacing.
With a fixed schedule the DiT timesteps are never rounded, and "unipc"/"dpmpp_2m" cap the first sigma
at 1 - 1e-6 (their log-SNR must be finite).
"""
from __future__ import annotations

import math
import numbers
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.samplers.base import FlowSampler
from engine.samplers.dpmpp2m import DPMPP2MSampler
from engine.samplers.euler import EulerAncestralSampler, EulerSampler
from engine.samplers.schedule import (
    SPACINGS, DynamicShift, Schedule, Shifting, check_schedule_args, fixed_schedule,
)
from engine.samplers.unipc import UniPCSampler

__all__ = [
    "DEFAULT_SAMPLER", "SAMPLER_ALIASES", "SPACINGS", "DynamicShift", "FlowSampler", "Sampler", "Schedule",
    "canonical_sampler", "list_samplers", "make_sampler",
]


class Sampler(Protocol):
    timesteps: Tensor
    """(steps,) float, the values passed to the DiT (0..1000)."""
    sigmas: Tensor
    """(steps + 1,) float, ending in 0."""

    def step(self, model_output: Tensor, index: int, sample: Tensor) -> Tensor: ...


DEFAULT_SAMPLER = "unipc"

_SAMPLERS: dict[str, type[FlowSampler]] = {
    cls.name: cls for cls in (UniPCSampler, EulerSampler, EulerAncestralSampler, DPMPP2MSampler)
}

SAMPLER_ALIASES: dict[str, str] = {
    "dpmpp2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpm++_2m": "dpmpp_2m",
    "euler_ancestral": "euler_a",
}
"""Other names users type, normalised as `canonical_sampler` does (lower case, '-' and ' ' as '_')."""

MAX_SEED = 2**64 - 1
"""torch.Generator.manual_seed takes seeds up to this."""


def list_samplers() -> list[str]:
    """Canonical sampler names, the default first (aliases: `SAMPLER_ALIASES`)."""
    return list(_SAMPLERS)


def canonical_sampler(name: str) -> str:
    """The canonical name of a sampler name or alias ("dpmpp2m", "DPM++ 2M" -> "dpmpp_2m").

    Raises ValueError listing the known names for anything else.
    """
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_").replace(" ", "_")
        key = SAMPLER_ALIASES.get(key, key)
        if key in _SAMPLERS:
            return key
    raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(_SAMPLERS)} "
                     f"(aliases: {', '.join(SAMPLER_ALIASES)})")


def make_sampler(
    name: str,
    num_steps: int,
    shift: float,
    *,
    timesteps: Sequence[float] | None = None,
    dynamic: DynamicShift | None = None,
    image_seq_len: int | None = None,
    shift_terminal: float | None = None,
    spacing: str = "scheduler",
    seed: int | None = None,
) -> Sampler:
    """A new sampler over `num_steps` steps.

    name: a canonical sampler name or an alias.
    shift: the static flow shift (not applied when `dynamic` is given, as in diffusers).
    timesteps: optional fixed training timesteps in (0, 1000], strictly decreasing, for
        step-distilled models (e.g. [1000, 750, 500, 250]); they are shifted like the default ones.
    dynamic: resolution-dependent shift; needs `image_seq_len` (the number of image tokens the DiT
        sees, e.g. (H / 16) * (W / 16) for Qwen-Image). image_seq_len is ignored without `dynamic`
        (as diffusers ignores mu), so callers may always pass it.
    shift_terminal: in (0, 1): the last shifted sigma is stretched to it.
    spacing: one of SPACINGS.
    seed: the noise seed of samplers that draw noise ("euler_a"; required there, ignored by the others).
    """
    cls = _SAMPLERS[canonical_sampler(name)]
    check_schedule_args(num_steps, shift)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if dynamic is not None and not isinstance(dynamic, DynamicShift):
        raise ValueError(f"dynamic must be a DynamicShift or None, got {dynamic!r}")
    if image_seq_len is not None and (isinstance(image_seq_len, bool) or not isinstance(image_seq_len, numbers.Integral)
                                      or image_seq_len < 1):
        raise ValueError(f"image_seq_len must be an integer >= 1, got {image_seq_len!r}")
    if dynamic is not None and image_seq_len is None:
        raise ValueError("image_seq_len is required with a dynamic shift (mu depends on it)")
    if shift_terminal is not None and (isinstance(shift_terminal, bool) or not isinstance(shift_terminal, numbers.Real)
                                       or not 0 < shift_terminal < 1):
        raise ValueError(f"shift_terminal must be a number in (0, 1) or None, got {shift_terminal!r}")
    _check_seed(cls, seed)

    if timesteps is None:
        shifting = Shifting(
            shift=shift,
            mu=None if dynamic is None else dynamic.mu(int(image_seq_len)),
            time_shift_type="exponential" if dynamic is None else dynamic.time_shift_type,
            shift_terminal=shift_terminal,
        )
        with np.errstate(divide="ignore", invalid="ignore"):   # 0 / 0 and the like: refused just below
            schedule = cls.build_schedule(num_steps, shifting, spacing)
        _check_built_schedule(schedule, cls.name, shifting, spacing)
    else:
        for option, value, default in (("dynamic", dynamic, None), ("shift_terminal", shift_terminal, None),
                                       ("spacing", spacing, "scheduler")):
            if value != default:
                raise ValueError(f"fixed timesteps take no {option} (got {value!r}): they are shifted by "
                                 f"the static shift only")
        values = list(timesteps)
        if len(values) != num_steps:
            raise ValueError(f"num_steps ({num_steps}) must equal len(timesteps) ({len(values)})")
        schedule = fixed_schedule(values, shift, max_sigma=cls.max_sigma)
    return cls(schedule, seed)


def _check_seed(cls: type[FlowSampler], seed: object) -> None:
    if seed is None:
        if cls.needs_seed:
            raise ValueError(f"sampler {cls.name!r} draws noise at every step and needs a seed "
                             f"(an integer in 0..2**64-1)")
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..2**64-1, got {seed!r}")


def _check_built_schedule(schedule: Schedule, name: str, shifting: Shifting, spacing: str) -> None:
    """Refuses settings whose schedule is unusable (e.g. shift_terminal with one step of sigma 1: 0 / 0)."""
    sigmas = schedule.sigmas
    ok = (bool(torch.isfinite(sigmas).all()) and bool((sigmas[:-1] > sigmas[1:]).all())
          and float(sigmas[0]) <= 1.0 and math.isfinite(float(schedule.timesteps.sum())))
    if not ok:
        raise ValueError(f"sampler {name!r} with {shifting} and spacing {spacing!r} gives an unusable "
                         f"schedule (sigmas must be finite, in (0, 1] and strictly decreasing): "
                         f"{sigmas.tolist()}")

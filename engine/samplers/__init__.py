"""Flow-matching samplers, by name: "unipc" (default, as the Wan pipelines), "euler", "dpmpp2m".

    sampler = make_sampler("unipc", num_steps=50, shift=5.0)
    for i, t in enumerate(sampler.timesteps):
        v = dit(x, t)                  # velocity at noise level sampler.sigmas[i]
        x = sampler.step(v, i, x)

One instance per request: multistep samplers keep the previous steps' predictions.

Step-distilled models run at fixed training timesteps instead of `num_steps` spaced ones:

    make_sampler("euler", 4, shift=5.0, timesteps=[1000, 750, 500, 250])

gives sigma_i = shift(t_i / 1000) = [1, 0.9375, 0.833, 0.625] then 0, and the DiT sees 1000 * sigma_i
(LightX2V's step-distill schedule, with a deterministic Euler update). `timesteps` works with every
sampler; `num_steps` must equal its length. With a fixed schedule the DiT timesteps are never
rounded, and "unipc"/"dpmpp2m" cap the first sigma at 1 - 1e-6 (their log-SNR must be finite).
"""
from __future__ import annotations

from typing import Protocol, Sequence

from torch import Tensor

from engine.samplers.base import FlowSampler
from engine.samplers.dpmpp2m import DPMPP2MSampler
from engine.samplers.euler import EulerSampler
from engine.samplers.schedule import Schedule, check_schedule_args, fixed_schedule
from engine.samplers.unipc import UniPCSampler

__all__ = ["DEFAULT_SAMPLER", "FlowSampler", "Sampler", "Schedule", "list_samplers", "make_sampler"]


class Sampler(Protocol):
    timesteps: Tensor
    """(steps,) float, the values passed to the DiT (0..1000)."""
    sigmas: Tensor
    """(steps + 1,) float, ending in 0."""

    def step(self, model_output: Tensor, index: int, sample: Tensor) -> Tensor: ...


DEFAULT_SAMPLER = "unipc"

_SAMPLERS: dict[str, type[FlowSampler]] = {
    cls.name: cls for cls in (UniPCSampler, EulerSampler, DPMPP2MSampler)
}


def list_samplers() -> list[str]:
    """Known sampler names, the default first."""
    return list(_SAMPLERS)


def make_sampler(
    name: str, num_steps: int, shift: float, *, timesteps: Sequence[float] | None = None
) -> Sampler:
    """A new sampler over `num_steps` steps with the given flow shift.

    timesteps: optional fixed training timesteps in (0, 1000], strictly decreasing, for
    step-distilled models (e.g. [1000, 750, 500, 250]); they are shifted like the default ones.
    """
    try:
        cls = _SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(_SAMPLERS)}") from None
    check_schedule_args(num_steps, shift)
    if timesteps is None:
        schedule = cls.default_schedule(num_steps, shift)
    else:
        values = list(timesteps)
        if len(values) != num_steps:
            raise ValueError(f"num_steps ({num_steps}) must equal len(timesteps) ({len(values)})")
        schedule = fixed_schedule(values, shift, max_sigma=cls.max_sigma)
    return cls(schedule)

"""The common part of every sampler: the schedule, step-order checks and the float32 round trip."""
from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from engine.samplers.schedule import Schedule, Shifting


def log_snr(sigma: float) -> float:
    """lambda(sigma) = log(alpha / sigma) with alpha = 1 - sigma (half the log signal-to-noise ratio).

    Only for 0 < sigma < 1; the samplers treat the final sigma = 0 (lambda = +inf) on their own.
    """
    return math.log(1.0 - sigma) - math.log(sigma)


class FlowSampler:
    """One sampling run over a fixed schedule. A new instance per request (it may keep history).

    The caller runs, for i = 0 .. steps - 1:
        v = dit(x, sampler.timesteps[i]);  x = sampler.step(v, i, x)
    Tensors may live on any device and be in any float dtype: the update is computed in float32 and
    returned in the dtype of `sample`. Subclasses implement `_update` on float32 tensors.
    """

    name: ClassVar[str]
    """Registry name (canonical)."""
    max_sigma: ClassVar[float] = 1.0
    """Largest first noise level the update can use (multistep solvers need log(1 - sigma))."""
    needs_seed: ClassVar[bool] = False
    """Whether the update draws noise (then `seed` is required; deterministic samplers ignore it)."""

    def __init__(self, schedule: Schedule, seed: int | None = None) -> None:
        self.sigmas: Tensor = schedule.sigmas          # (steps + 1,) float32, ends in 0
        self.timesteps: Tensor = schedule.timesteps    # (steps,) float32, values for the DiT
        self._sigma = [float(s) for s in schedule.sigmas]  # python floats for the scalar maths
        self._next_index = 0

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def step(self, model_output: Tensor, index: int, sample: Tensor) -> Tensor:
        """Moves `sample` from sigmas[index] to sigmas[index + 1] given the DiT's velocity there."""
        if index != self._next_index or index >= self.num_steps:
            expected = "none (all steps are done)" if self._next_index >= self.num_steps else self._next_index
            raise ValueError(
                f"{self.name} sampler: step index must be {expected} (steps run in order "
                f"0..{self.num_steps - 1}, once each), got {index}"
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
        x = sample.float()
        v = model_output.float()
        out = self._update(v, index, x)
        self._next_index += 1
        return out.to(sample.dtype)

    @staticmethod
    def build_schedule(num_steps: int, shifting: Shifting, spacing: str) -> Schedule:
        """The schedule this sampler's diffusers scheduler builds for these settings."""
        raise NotImplementedError

    def _update(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

"""Noise schedules for flow-matching samplers.

Flow matching (rectified flow) interpolates data x0 and noise eps linearly:

    x_sigma = (1 - sigma) * x0 + sigma * eps,      sigma in [0, 1]

and the DiT predicts the velocity v = eps - x0 at timestep t = 1000 * sigma.
A schedule is the decreasing list of noise levels sigma_0 > sigma_1 > ... > sigma_N = 0 a sampler
walks down, and the timesteps t_i the DiT is shown at each of the N steps.

The "shift" bends the schedule towards high noise (more steps spent on the coarse layout):

    shift(sigma) = s * sigma / (1 + (s - 1) * sigma)          (s = 1: unchanged)

Each sampler spaces its sigmas exactly as its diffusers counterpart does (see the `default_schedule`
of each sampler); `fixed_schedule` serves step-distilled models, which are trained on a few fixed
timesteps such as [1000, 750, 500, 250].

Schedules are computed in float64 (numpy, as diffusers does) and stored in float32.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
"""The DiT's training timesteps run over [0, 1000]; t = 1000 * sigma."""


@dataclass(frozen=True)
class Schedule:
    """The noise levels and DiT timesteps of one sampling run (CPU, float32)."""

    sigmas: Tensor
    """(steps + 1,) strictly decreasing, in (0, 1], ending in 0."""
    timesteps: Tensor
    """(steps,) the timestep passed to the DiT at each step, in [0, 1000]."""

    def __post_init__(self) -> None:
        steps = self.timesteps.shape[0]
        if self.sigmas.shape != (steps + 1,) or self.sigmas[-1] != 0:
            raise ValueError(f"a schedule needs steps + 1 sigmas ending in 0, got {self.sigmas.tolist()}")

    @staticmethod
    def from_sigmas(sigmas: np.ndarray, timesteps: np.ndarray | Tensor) -> "Schedule":
        """Builds a schedule from the N positive sigmas (float64) by appending the final 0."""
        sigmas32 = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        return Schedule(sigmas=sigmas32, timesteps=torch.as_tensor(timesteps, dtype=torch.float32))


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """shift(sigma) = s * sigma / (1 + (s - 1) * sigma), elementwise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def check_schedule_args(num_steps: object, shift: object) -> None:
    """Raises ValueError naming the field when num_steps or shift is unusable."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


def fixed_schedule(timesteps: Sequence[float], shift: float, max_sigma: float = 1.0) -> Schedule:
    """The schedule of a step-distilled model: fixed training-grid timesteps, then shifted.

    sigma_i = min(shift(t_i / 1000), max_sigma);  the DiT sees 1000 * sigma_i;  sigma_N = 0.
    This is LightX2V's step-distill schedule: [1000, 750, 500, 250] with shift 5 runs the DiT at
    [1000, 937.5, 833.3, 625]. Multistep samplers pass max_sigma < 1, since they need
    log((1 - sigma) / sigma) to be finite (diffusers' UniPC lowers a first sigma of 1 by 1e-6 too).
    """
    values = list(timesteps)
    if not values or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in values):
        raise ValueError(f"timesteps must be a non-empty list of numbers, got {timesteps!r}")
    if not all(0 < t <= NUM_TRAIN_TIMESTEPS for t in values):
        raise ValueError(f"timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {values}")

    sigmas = shift_sigmas(np.asarray(values, dtype=np.float64) / NUM_TRAIN_TIMESTEPS, shift)
    sigmas = np.minimum(sigmas, max_sigma)
    sigmas32 = torch.from_numpy(sigmas.astype(np.float32))
    if not bool((sigmas32[:-1] > sigmas32[1:]).all()):
        raise ValueError(f"timesteps {values} with shift {shift} give equal noise levels {sigmas32.tolist()}")
    return Schedule.from_sigmas(sigmas, sigmas32 * NUM_TRAIN_TIMESTEPS)

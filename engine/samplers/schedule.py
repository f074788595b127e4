"""Noise schedules for flow-matching samplers.

Flow matching (rectified flow) interpolates data x0 and noise eps linearly:

    x_sigma = (1 - sigma) * x0 + sigma * eps,      sigma in [0, 1]

and the DiT predicts the velocity v = eps - x0 at timestep t = 1000 * sigma.
A schedule is the decreasing list of noise levels sigma_0 > sigma_1 > ... > sigma_N = 0 a sampler
walks down, and the timesteps t_i the DiT is shown at each of the N steps.

The "shift" bends the schedule towards high noise (more steps spent on the coarse layout):

    shift(sigma) = s * sigma / (1 + (s - 1) * sigma)          (s = 1: unchanged)

Each sampler spaces its sigmas exactly as its diffusers counterpart does (see the `build_schedule`
of each sampler); `fixed_schedule` serves step-distilled models, which are trained on a few fixed
timesteps such as [1000, 750, 500, 250].

Resolution-dependent ("dynamic") shift, as diffusers' FlowMatchEulerDiscreteScheduler with
use_dynamic_shifting and the Flux / Qwen-Image pipelines: the pipeline computes

    mu = m * image_seq_len + b,   the line through (base_image_seq_len, base_shift) and
                                  (max_image_seq_len, max_shift)          (`calculate_shift`)

and the sigmas are shifted by the time shift of type

    exponential:  e^mu / (e^mu + (1 / sigma - 1))      (= shift(sigma) with s = e^mu)
    linear:       mu / (mu + (1 / sigma - 1))          (= shift(sigma) with s = mu)

instead of the static shift. Then, when `shift_terminal` is set, the shifted sigmas are stretched so
that the last one equals it:  sigma' = 1 - (1 - sigma) * (1 - shift_terminal) / (1 - sigma_last).

Which unshifted sigmas a sampler starts from is the *spacing* (see `SPACINGS`): the scheduler's own
`set_timesteps(num_steps)` grid, or the sigmas a diffusers pipeline hands the scheduler.

Schedules are computed as diffusers computes them (numpy, float64, or float32 where the diffusers
scheduler casts first) and stored in float32.
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
    """shift(sigma) = s * sigma / (1 + (s - 1) * sigma), elementwise (keeps the dtype of `sigmas`)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# ----------------------------------------------------------------------------- spacing

SPACINGS: dict[str, str] = {
    "scheduler": "the scheduler's own grid, as set_timesteps(num_steps) builds it (Wan pipelines)",
    "linear": "np.linspace(1, 1 / n, n) passed as sigmas (Qwen-Image and Flux pipelines)",
    "linear_to_zero": "np.linspace(1, 0, n + 1)[:-1] passed as sigmas (HunyuanVideo-1.5 pipelines)",
}
"""Where the unshifted sigmas of a run come from. "linear" and "linear_to_zero" are the same n
points 1, (n-1)/n, .., 1/n, computed the two ways the pipelines compute them (they can differ in the
last bit in float64)."""


def pipeline_sigmas(spacing: str, num_steps: int) -> np.ndarray:
    """The (num_steps,) float64 unshifted sigmas a diffusers pipeline passes for `spacing`."""
    if spacing == "linear":
        return np.linspace(1.0, 1.0 / num_steps, num_steps)
    if spacing == "linear_to_zero":
        return np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    raise ValueError(f"spacing {spacing!r} passes no sigmas; pipeline spacings: linear, linear_to_zero")


# ----------------------------------------------------------------------------- shifting

TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass(frozen=True)
class DynamicShift:
    """Resolution-dependent shift parameters (a diffusers scheduler config's dynamic-shift fields)."""

    base_shift: float = 0.5
    """mu at base_image_seq_len."""
    max_shift: float = 1.15
    """mu at max_image_seq_len."""
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    """"exponential" (s = e^mu) or "linear" (s = mu)."""

    def __post_init__(self) -> None:
        for field in ("base_shift", "max_shift"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"dynamic shift: {field} must be a finite number, got {value!r}")
        for field in ("base_image_seq_len", "max_image_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"dynamic shift: {field} must be an integer >= 1, got {value!r}")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError(f"dynamic shift: max_image_seq_len must differ from base_image_seq_len "
                             f"(both {self.base_image_seq_len})")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"dynamic shift: time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, "
                             f"got {self.time_shift_type!r}")

    def mu(self, image_seq_len: int) -> float:
        """diffusers' `calculate_shift` (pipeline_qwenimage.py, pipeline_flux.py), same operation order."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_seq_len * m + b


@dataclass(frozen=True)
class Shifting:
    """How the unshifted sigmas are bent: the static shift, or the time shift by mu; then the stretch."""

    shift: float
    """Static shift; not used when `mu` is set (as diffusers' use_dynamic_shifting)."""
    mu: float | None = None
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    """When set, the last shifted sigma is stretched to this value."""

    @property
    def dynamic(self) -> bool:
        return self.mu is not None

    def shift_only(self, sigmas: np.ndarray) -> np.ndarray:
        """The static shift or the time shift, elementwise, in the dtype of `sigmas` (0 < sigma <= 1)."""
        if self.mu is None:
            return shift_sigmas(sigmas, self.shift)
        if self.time_shift_type == "exponential":
            e_mu = math.exp(self.mu)
            return e_mu / (e_mu + (1 / sigmas - 1))
        return self.mu / (self.mu + (1 / sigmas - 1))

    def apply(self, sigmas: np.ndarray) -> np.ndarray:
        """Steps 2 and 3 of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps (UniPC alike)."""
        sigmas = self.shift_only(sigmas)
        if self.shift_terminal:
            sigmas = stretch_to_terminal(sigmas, self.shift_terminal)
        return sigmas


FIRST_SIGMA_EPS = 1e-6
"""Multistep samplers lower a first sigma within this of 1 by this much (alpha = 1 - sigma = 0 would
make their log-SNR infinite); diffusers' UniPC does the same."""


def multistep_flow_schedule(unshifted: np.ndarray, shifting: Shifting) -> Schedule:
    """UniPCMultistepScheduler(use_flow_sigmas=True).set_timesteps from float64 unshifted sigmas.

    Shift (static or dynamic) and stretch, a first sigma of 1 lowered by FIRST_SIGMA_EPS, timesteps
    truncated to integers (t_i = floor(1000 * sigma_i)), a final 0 appended.
    """
    sigmas = shifting.apply(np.asarray(unshifted, dtype=np.float64))
    if abs(sigmas[0] - 1.0) < FIRST_SIGMA_EPS:
        sigmas[0] -= FIRST_SIGMA_EPS
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)   # truncated, as the reference
    return Schedule.from_sigmas(sigmas, timesteps)


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """sigma' = 1 - (1 - sigma) / ((1 - sigma_last) / (1 - shift_terminal)): the last one becomes
    shift_terminal, sigma = 1 stays 1 (diffusers' `stretch_shift_to_terminal`, same operations)."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - (one_minus / scale)


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

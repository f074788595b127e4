"""Euler samplers for flow matching, as diffusers' FlowMatchEulerDiscreteScheduler.

"euler" (stochastic_sampling=False), one explicit Euler step of the flow ODE dx/dsigma = v:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i

"euler_a" (stochastic_sampling=True, ancestral): predict the clean sample, then noise it afresh to
the next level:

    x0_i = x_i - sigma_i * v_i,     x_{i+1} = (1 - sigma_{i+1}) * x0_i + sigma_{i+1} * eps_i

Its noise eps_i comes from torch.Generator("cpu").manual_seed(seed), drawn in float32 on the CPU and
then moved to the sample's device, so a seed gives the same result on every device. Order of the
draws, each `torch.randn(sample.shape, generator=g, dtype=torch.float32)`:
  1. one draw that is thrown away: the initial latents (denoise draws them from the same seed; the
     step noise continues that stream, exactly as a diffusers pipeline whose one `generator` drew the
     latents and were then passed to `scheduler.step(..., generator=generator)`);
  2. one draw per step i whose target sigma_{i+1} is not 0 (the last step, to 0, needs none and
     draws none; diffusers draws one there but multiplies it by 0).

Timesteps: t_i = 1000 * sigma_i (float32, not rounded).

Schedule with the "scheduler" spacing, as diffusers builds it: the training grid sigma = t / 1000,
t = 1000 .. 1, is shifted once (in float32; not when the shift is dynamic) to find its end points
sigma_max = 1 and sigma_min; N points are spaced linearly between them and shifted *again*:

    sigma_i = shift(linspace(sigma_max, sigma_min, N)[i]),   sigma_N = 0

(The double shift only moves the last point: with shift 3 and 2 steps the timesteps are
[1000, 8.9].) With a pipeline spacing the given sigmas are cast to float32 first and shifted in
float32, as set_timesteps(sigmas=...) does. A dynamic shift or shift_terminal enter as in
`schedule.Shifting.apply`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from engine.samplers.base import FlowSampler
from engine.samplers.schedule import NUM_TRAIN_TIMESTEPS, Schedule, Shifting, pipeline_sigmas


def flow_match_euler_schedule(num_steps: int, shifting: Shifting, spacing: str) -> Schedule:
    """FlowMatchEulerDiscreteScheduler(shift, use_dynamic_shifting, shift_terminal).set_timesteps."""
    # 1. Unshifted sigmas.
    if spacing == "scheduler":
        # End points of the training grid, shifted at construction unless the shift is dynamic.
        grid_shift = 1.0 if shifting.dynamic else shifting.shift
        grid_ends = torch.tensor([NUM_TRAIN_TIMESTEPS, 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
        sigma_max, sigma_min = (grid_shift * grid_ends / (1 + (grid_shift - 1) * grid_ends)).tolist()
        t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
        sigmas = t / NUM_TRAIN_TIMESTEPS                                           # float64
    else:
        sigmas = pipeline_sigmas(spacing, num_steps).astype(np.float32)            # float32, as diffusers
    # 2. Shift (static or dynamic), then the terminal stretch.
    sigmas = shifting.apply(sigmas)
    # 3. The DiT sees 1000 * sigma (float32, not rounded).
    sigmas32 = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return Schedule(sigmas=torch.cat([sigmas32, sigmas32.new_zeros(1)]), timesteps=sigmas32 * NUM_TRAIN_TIMESTEPS)


class EulerSampler(FlowSampler):
    name = "euler"

    @staticmethod
    def build_schedule(num_steps: int, shifting: Shifting, spacing: str) -> Schedule:
        return flow_match_euler_schedule(num_steps, shifting, spacing)

    def _update(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        dt = self._sigma[i + 1] - self._sigma[i]   # negative: towards less noise
        return x + dt * v


class EulerAncestralSampler(EulerSampler):
    name = "euler_a"
    needs_seed = True

    def __init__(self, schedule: Schedule, seed: int | None = None) -> None:
        super().__init__(schedule, seed)
        self._generator = torch.Generator("cpu").manual_seed(seed)
        self._skipped_initial_draw = False

    def _noise(self, like: Tensor) -> Tensor:
        """The next standard-normal draw of the seeded CPU stream, float32, on `like`'s device."""
        if not self._skipped_initial_draw:
            torch.randn(like.shape, generator=self._generator, dtype=torch.float32)   # the initial latents
            self._skipped_initial_draw = True
        return torch.randn(like.shape, generator=self._generator, dtype=torch.float32).to(like.device)

    def _update(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        sigma, sigma_next = self._sigma[i], self._sigma[i + 1]
        x0 = x - sigma * v
        if sigma_next == 0.0:
            return x0
        return (1.0 - sigma_next) * x0 + sigma_next * self._noise(x)

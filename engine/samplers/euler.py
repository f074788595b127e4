"""Euler sampler for flow matching (as diffusers' FlowMatchEulerDiscreteScheduler(shift=shift)).

Update (one explicit Euler step of the flow ODE dx/dsigma = v):

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i

Timesteps: t_i = 1000 * sigma_i (not rounded).

Schedule, as diffusers builds it: the training grid sigma = t / 1000, t = 1000 .. 1, is shifted once
(in float32) to find its end points sigma_max = 1 and sigma_min = shift(0.001); N points are spaced
linearly between them and shifted *again*:

    sigma_i = shift(linspace(sigma_max, sigma_min, N)[i]),   sigma_N = 0

(The double shift only moves the last point: with shift 3 and 2 steps the timesteps are
[1000, 8.9].) Stateless apart from the step counter.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from engine.samplers.base import FlowSampler
from engine.samplers.schedule import NUM_TRAIN_TIMESTEPS, Schedule, shift_sigmas


class EulerSampler(FlowSampler):
    name = "euler"

    @staticmethod
    def default_schedule(num_steps: int, shift: float) -> Schedule:
        # 1. End points of the shifted training grid, computed in float32 as the reference does.
        grid_ends = torch.tensor([NUM_TRAIN_TIMESTEPS, 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
        sigma_max, sigma_min = (shift * grid_ends / (1 + (shift - 1) * grid_ends)).tolist()
        # 2. Linear spacing in timestep units, back to sigma, shifted a second time (float64).
        t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
        sigmas = shift_sigmas(t / NUM_TRAIN_TIMESTEPS, shift)
        # 3. The DiT sees 1000 * sigma (float32, not rounded).
        sigmas32 = torch.from_numpy(sigmas.astype(np.float32))
        return Schedule.from_sigmas(sigmas, sigmas32 * NUM_TRAIN_TIMESTEPS)

    def _update(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        dt = self._sigma[i + 1] - self._sigma[i]   # negative: towards less noise
        return x + dt * v

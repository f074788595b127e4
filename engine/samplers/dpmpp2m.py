"""DPM-Solver++(2M) for flow matching.

Same schedule and update as diffusers' DPMSolverMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2) with its
defaults (solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero").

Notation as in unipc.py: alpha = 1 - sigma, lambda = log(alpha / sigma), m_i = x_i - sigma_i * v_i.

Schedule ("scheduler" spacing):
    sigma_i = shift(1 - linspace(1, 0.001, N + 1))[N - i], i < N  (so sigma_0 = shift(0.999)),
    sigma_N = 0;  t_i = floor(1000 * sigma_i).
A dynamic shift is the static one with s = e^mu, as diffusers' set_timesteps(mu=...) sets
flow_shift = exp(mu) (diffusers has only the exponential type; "linear" uses s = mu). Beyond
diffusers (whose DPMSolverMultistepScheduler takes neither): shift_terminal stretches these sigmas as
in `schedule.stretch_to_terminal`, and a pipeline spacing builds the schedule exactly as UniPC does
(`schedule.multistep_flow_schedule`).

Update from sigma_s0 = sigma_i to sigma_t = sigma_{i+1}, h = lambda_t - lambda_s0:
    x_t = (sigma_t / sigma_s0) * x_i - alpha_t * (e^{-h} - 1) * D
    first order (first step, and the last one, whose target 0 makes x_t = m_i):  D = m_i
    second order (midpoint):  D = m_i + 0.5 * (m_i - m_{i-1}) / r,  r = (lambda_i - lambda_{i-1}) / h
"""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from engine.samplers.base import FlowSampler, log_snr
from engine.samplers.schedule import (
    FIRST_SIGMA_EPS, NUM_TRAIN_TIMESTEPS, Schedule, Shifting, multistep_flow_schedule, pipeline_sigmas,
    shift_sigmas, stretch_to_terminal,
)


class DPMPP2MSampler(FlowSampler):
    name = "dpmpp_2m"
    max_sigma = 1.0 - FIRST_SIGMA_EPS   # for fixed schedules: lambda must be finite

    def __init__(self, schedule: Schedule, seed: int | None = None) -> None:
        super().__init__(schedule, seed)
        self._prev_m: Tensor | None = None   # data prediction of the previous step

    @staticmethod
    def build_schedule(num_steps: int, shifting: Shifting, spacing: str) -> Schedule:
        if spacing != "scheduler":
            return multistep_flow_schedule(pipeline_sigmas(spacing, num_steps), shifting)
        if shifting.mu is None:
            flow_shift = shifting.shift
        elif shifting.time_shift_type == "exponential":
            flow_shift = np.exp(shifting.mu)
        else:
            flow_shift = shifting.mu
        noise_levels = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)   # 0 .. 0.999
        sigmas = np.flip(shift_sigmas(noise_levels, flow_shift))[:-1].copy()            # drop the 0
        if shifting.shift_terminal:
            sigmas = stretch_to_terminal(sigmas, shifting.shift_terminal)
        timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)   # truncated, as the reference
        return Schedule.from_sigmas(sigmas, timesteps)

    def _update(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        # 1. Data prediction.
        m = x - self._sigma[i] * v
        prev_m, self._prev_m = self._prev_m, m
        s0, t = self._sigma[i], self._sigma[i + 1]
        if t == 0.0:
            # lambda_t = +inf: e^{-h} = 0 and sigma_t = 0, so x_t = m (first order).
            return m.clone()
        # 2. Step in log-SNR.
        h = log_snr(t) - log_snr(s0)
        if prev_m is None:
            d = m
        else:
            r = (log_snr(s0) - log_snr(self._sigma[i - 1])) / h
            d = m + (0.5 / r) * (m - prev_m)
        return (t / s0) * x - ((1.0 - t) * math.expm1(-h)) * d

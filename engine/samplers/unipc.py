"""UniPC sampler (the Wan pipelines' default), solver order 2, B(h) = e^h - 1 ("bh2").

Same schedule and update as diffusers' UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=shift, solver_order=2, lower_order_final=True), which is the Wan
release's scheduler_config (final_sigmas_type="zero", no thresholding, corrector on every step).

Notation (flow matching, x = alpha * x0 + sigma * eps):
    alpha_i = 1 - sigma_i,   lambda_i = log(alpha_i / sigma_i),   h = lambda_t - lambda_s0 > 0
    m_i = x_i - sigma_i * v_i             data prediction (x0 estimate) at step i

Schedule ("scheduler" spacing):
    sigma_i = shift(linspace(1, 0.001, N + 1)[i]), i < N  (the first one lowered by 1e-6 when it is 1,
    to keep lambda finite), sigma_N = 0;  t_i = floor(1000 * sigma_i).
With a pipeline spacing, the pipeline's sigmas replace linspace(1, 0.001, N + 1)[:N] (float64, as
set_timesteps(sigmas=...)); a dynamic shift and shift_terminal as in `schedule.Shifting.apply`.

Predictor UniP, from sigma_s0 = sigma_i to sigma_t = sigma_{i+1}, with phi = e^{-h} - 1:
    order 1:  x_t = (sigma_t / sigma_s0) * x_i - alpha_t * phi * m_i
    order 2:  ... - alpha_t * phi * 0.5 * D,   D = (m_{i-1} - m_i) / r,  r = (lambda_{i-1} - lambda_i) / h
    Order = min(2, i + 1, N - i): first order at the first step (no history) and at the last
    ("lower_order_final"), whose target sigma_N = 0 makes the update exactly x_t = m_i.

Corrector UniC, when the model output at step i arrives: the predictor's result x_i is rebuilt
from x_{i-1} using m_i as well (same order p as that predictor step; s0 = i - 1, t = i):
    x_i <- (sigma_t / sigma_s0) * x_{i-1} - alpha_t * phi * m_{i-1}
           - alpha_t * phi * (rho_1 * D + rho_t * (m_i - m_{i-1}))
    p = 1:  rho_t = 1/2
    p = 2:  [[1, 1], [r, 1]] @ [rho_1, rho_t] = [g1 / phi, 2 * g2 / phi],
            g1 = phi / (-h) - 1,  g2 = g1 / (-h) - 1/2,  D and r as above with s1 = i - 2
Then m_i (computed from the *uncorrected* x_i) enters the history, and the predictor runs from
the corrected x_i.
"""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from engine.samplers.base import FlowSampler, log_snr
from engine.samplers.schedule import (
    FIRST_SIGMA_EPS, NUM_TRAIN_TIMESTEPS, Schedule, Shifting, multistep_flow_schedule, pipeline_sigmas,
)


class UniPCSampler(FlowSampler):
    name = "unipc"
    max_sigma = 1.0 - FIRST_SIGMA_EPS

    def __init__(self, schedule: Schedule, seed: int | None = None) -> None:
        super().__init__(schedule, seed)
        self._m: list[Tensor] = []              # data predictions of the last (up to) two steps
        self._last_x: Tensor | None = None      # the sample the last predictor step started from
        self._last_order = 0                    # that predictor step's order

    @staticmethod
    def build_schedule(num_steps: int, shifting: Shifting, spacing: str) -> Schedule:
        if spacing == "scheduler":
            unshifted = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1]
        else:
            unshifted = pipeline_sigmas(spacing, num_steps)
        return multistep_flow_schedule(unshifted, shifting)

    def _update(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        # 1. Data prediction from the sample the DiT saw.
        m = x - self._sigma[i] * v
        # 2. Corrector: refine x_i (the previous predictor's output) now that m_i is known.
        if i > 0:
            x = self._correct(m, i)
        # 3. History, then the predictor from the corrected x_i.
        self._m = [*self._m[-1:], m]
        order = min(2, i + 1, self.num_steps - i)
        self._last_x, self._last_order = x, order
        return self._predict(x, i, order)

    def _predict(self, x: Tensor, i: int, order: int) -> Tensor:
        s0, t = self._sigma[i], self._sigma[i + 1]
        m0 = self._m[-1]
        if t == 0.0:
            # lambda_t = +inf: phi = -1 and sigma_t = 0, so x_t = m0 (order is 1 here).
            return m0.clone()
        h = log_snr(t) - log_snr(s0)
        phi = math.expm1(-h)
        alpha_t = 1.0 - t
        x_t = (t / s0) * x - (alpha_t * phi) * m0
        if order == 2:
            r = (log_snr(self._sigma[i - 1]) - log_snr(s0)) / h
            d = (self._m[-2] - m0) / r
            x_t = x_t - (alpha_t * phi * 0.5) * d
        return x_t

    def _correct(self, m_t: Tensor, i: int) -> Tensor:
        s0, t = self._sigma[i - 1], self._sigma[i]
        m0 = self._m[-1]
        h = log_snr(t) - log_snr(s0)
        phi = math.expm1(-h)
        alpha_t = 1.0 - t
        x_t = (t / s0) * self._last_x - (alpha_t * phi) * m0
        if self._last_order == 1:
            correction = 0.5 * (m_t - m0)
        else:
            r = (log_snr(self._sigma[i - 2]) - log_snr(s0)) / h
            d = (self._m[-2] - m0) / r
            g1 = phi / (-h) - 1.0
            g2 = g1 / (-h) - 0.5
            b1, b2 = g1 / phi, 2.0 * g2 / phi
            rho_1 = (b1 - b2) / (1.0 - r)
            rho_t = b1 - rho_1
            correction = rho_1 * d + rho_t * (m_t - m0)
        return x_t - (alpha_t * phi) * correction

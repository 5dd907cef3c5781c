"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2) on any schedule and objective.

It integrates the probability-flow ODE in the schedule's coordinates y = x_t / s(t) = A x_0 + B eps, which are straight
in its time tau for fixed x_0 and eps (schedules.NoiseSchedule.ode: EDM's y = x_t / alpha = x_0 + tau eps with
tau = sigma / alpha; on rectified flow y = x_t, tau = t). Euler predicts, and Heun's correction averages the slopes
dy/dtau = (dA x_0 + dB eps) / dtau at both ends: y' = y + (dA (x_0 + x_0') + dB (eps + eps')) / 2. The last step, to
the clean image, and a step from pure noise in coordinates that cannot hold it are Euler's. Karras sigmas (rho spacing of
tau, sampler.grids.karras) over the schedule's trained range by default; 2N - 1 evaluations. Churn S_churn > 0 adds noise
first (gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]): tau_hat = (1 + gamma) tau.
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.samplers.base import Noise, Sampler, renoise
from difflab.samplers.grids import check_settings, karras
from difflab.schedules import NoiseSchedule
from difflab.validate import number


class HeunSampler(Sampler):
    """steps N (2N - 1 evaluations); churn S_churn with S_tmin, S_tmax, S_noise as in EDM (churn 0: deterministic)."""

    name = "heun"

    def __init__(self, steps: int = 18, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None,
                 churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, clip_x0: bool = False) -> None:
        check_settings(steps)
        number("sampler.rho", rho, 1e-3, hint=" (EDM: 7)")
        number("sampler.churn", churn, 0, hint=" (0: deterministic; EDM uses 0-80)")
        self.steps, self.rho, self.sigma_min, self.sigma_max = steps, rho, sigma_min, sigma_max
        self.churn, self.s_tmin, self.s_tmax, self.s_noise, self.clip_x0 = churn, s_tmin, s_tmax, s_noise, clip_x0

    def times(self, schedule: NoiseSchedule) -> list[float]:
        return karras(schedule, self.steps, self.rho, self.sigma_min, self.sigma_max)

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        tau = schedule.ode(cur)[1]
        gamma = min(self.churn / self.steps, math.sqrt(2) - 1) if self.s_tmin <= tau <= self.s_tmax else 0.0
        if gamma > 0:  # x_hat ~ q(x_hat | x) at tau_hat = (1 + gamma) tau (within the schedule), the noise scaled by S_noise
            hat = schedule.level(schedule.t_of_tau(tau * (1 + gamma)))
            if hat.t > cur.t:
                x, cur = renoise(x, cur, hat, noise, self.s_noise), hat
        den = self.read(x, denoise, cur)
        # Euler: x' = alpha' x_0 + sigma' eps
        x_next = nxt.alpha * den.x0 + nxt.sigma * den.eps
        (s, tau), s_next = schedule.ode(cur), schedule.ode(nxt)[0]
        if nxt.clean or s == 0 or math.isinf(tau):
            return x_next, den.x0
        fix = self.read(x_next, denoise, nxt)
        # y' = y + (dA (x_0 + x_0') + dB (eps + eps')) / 2, A = alpha / s, B = sigma / s; x' = s' y'
        dA, dB = nxt.alpha / s_next - cur.alpha / s, nxt.sigma / s_next - cur.sigma / s
        y_next = x / s + (dA * (den.x0 + fix.x0) + dB * (den.eps + fix.eps)) / 2
        return s_next * y_next, fix.x0

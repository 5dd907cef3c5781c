"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in the data prediction.

With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t) and h = lambda_prev - lambda_t:
x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D, where D = x0_t (first step and the final
step to the clean image) or D = (1 + 1/(2r)) x0_t - 1/(2r) x0_last with r = h_last / h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.samplers.base import Noise, Sampler, alpha_bar, check_settings, solver_timesteps
from difflab.schedules import NoiseSchedule


class DPMSolverPP2MSampler(Sampler):
    name = "dpmpp"

    def __init__(self, steps: int = 15, spacing: str = "linspace", clip_x0: bool = True) -> None:
        check_settings(steps, spacing)
        self.steps = steps
        self.spacing = spacing
        self.clip_x0 = clip_x0
        self._last: tuple[Tensor, Tensor] | None = None  # (x0, lambda) of the previous step

    def timesteps(self, T: int) -> list[int]:
        return solver_timesteps(T, self.steps, self.spacing)

    def reset(self) -> None:
        self._last = None

    def step(self, s: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, generator: Noise | None) -> tuple[Tensor, Tensor]:
        x0 = self.predict_x0(s, x_t, t, eps)
        ab = alpha_bar(s, t)
        lam = 0.5 * (ab.log() - (1 - ab).log())
        last, self._last = self._last, (x0, lam)
        if t_prev < 0:
            return x0, x0  # sigma_prev = 0: the update reduces to x_prev = D, taken first-order
        ab_prev = alpha_bar(s, t_prev)
        alpha_prev, sigma_prev, sigma_t = ab_prev.sqrt(), (1 - ab_prev).sqrt(), (1 - ab).sqrt()
        lam_prev = 0.5 * (ab_prev.log() - (1 - ab_prev).log())
        h = lam_prev - lam
        if last is None:
            d = x0
        else:
            x0_last, lam_last = last
            r = (lam - lam_last) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        return sigma_prev / sigma_t * x_t - alpha_prev * torch.expm1(-h) * d, x0

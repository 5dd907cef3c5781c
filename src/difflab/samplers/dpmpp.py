"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in the data prediction.

With lambda = log(alpha / sigma) and h = lambda_s - lambda_t: x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, where
D = x0_t (the first step, the final step to the clean image, and after a level of pure noise, whose lambda is -inf) or
D = (1 + 1/(2r)) x0_t - 1/(2r) x0_last with r = h_last / h.
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.samplers.base import Noise, Sampler
from difflab.samplers.grids import check_settings, solver_spaced
from difflab.schedules import NoiseSchedule


class DPMSolverPP2MSampler(Sampler):
    name = "dpmpp"

    def __init__(self, steps: int = 15, spacing: str = "linspace", clip_x0: bool = True) -> None:
        check_settings(steps, spacing)
        self.steps = steps
        self.spacing = spacing
        self.clip_x0 = clip_x0
        self._last: tuple[Tensor, float] | None = None  # (x0, lambda) of the previous step

    def times(self, schedule: NoiseSchedule) -> list[float]:
        return solver_spaced(schedule, self.steps, self.spacing)

    def reset(self) -> None:
        self._last = None

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        x0 = self.read(x, denoise, cur).x0
        last, self._last = self._last, (x0, cur.lam)
        if nxt.clean:
            return x0, x0  # sigma_s = 0: the update reduces to x_s = D, taken first-order
        h = nxt.lam - cur.lam
        if last is None or math.isinf(last[1]):
            d = x0
        else:
            x0_last, lam_last = last
            r = (cur.lam - lam_last) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        return (nxt.sigma / cur.sigma) * x - (nxt.alpha * math.expm1(-h)) * d, x0

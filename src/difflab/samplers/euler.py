"""Euler's method on the probability-flow ODE (the flow-matching default; k-diffusion's and EDM's first order):
with x_0 and eps held over the step, x moves to x_s = alpha_s x_0 + sigma_s eps. On rectified flow that is
x_t + (s - t) u with the velocity u = eps - x_0 (diffusers' FlowMatchEulerDiscreteScheduler); on a VP schedule, Euler in
EDM's (x_t / alpha, sigma / alpha), i.e. DDIM with eta = 0 and no clipping."""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.samplers.base import Noise, Sampler
from difflab.samplers.grids import check_settings, spaced
from difflab.schedules import NoiseSchedule


class EulerSampler(Sampler):
    name = "euler"

    def __init__(self, steps: int = 30, spacing: str = "trailing", clip_x0: bool = False) -> None:
        check_settings(steps, spacing)
        self.steps, self.spacing, self.clip_x0 = steps, spacing, clip_x0

    def times(self, schedule: NoiseSchedule) -> list[float]:
        return spaced(schedule, self.steps, self.spacing)

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        den = self.read(x, denoise, cur)
        # x_s = alpha_s x_0 + sigma_s eps
        return nxt.alpha * den.x0 + nxt.sigma * den.eps, den.x0

"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), from any level t to any s < t: x_s ~ q(x_s | x_t, x_0) with
the model's x_0. On a T-step VP grid, step by step, this is DDPM exactly (beta_t = 1 - alpha_bar_t / alpha_bar_{t-1})."""

from __future__ import annotations

import math

from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.samplers.base import Noise, Sampler, noise_like
from difflab.samplers.grids import every_step
from difflab.schedules import NoiseSchedule
from difflab.validate import choice, integer

VARIANCES = ("beta", "posterior")


class DDPMSampler(Sampler):
    """Every step of a T-step grid (``steps`` uniform steps of a continuous schedule, 1000 by default). variance="beta": the step's own
    variance sigma_{t|s}^2 (beta_t); "posterior": the posterior's, sigma_{t|s}^2 sigma_s^2 / sigma_t^2 (beta~_t)."""

    name = "ddpm"

    def __init__(self, variance: str = "beta", clip_x0: bool = False, steps: int | None = None) -> None:
        self.variance = choice("sampler.variance", variance, VARIANCES, " (beta: Ho et al.'s sigma_t^2 = beta_t)")
        self.clip_x0 = clip_x0
        # a continuous schedule's steps (None: 1000); a T-step grid takes all T
        self.steps = integer("sampler.steps", steps, 1, " (a continuous schedule's steps)") if steps is not None else None

    def times(self, schedule: NoiseSchedule) -> list[float]:
        return every_step(schedule, self.steps or 1000)

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        x0 = self.read(x, denoise, cur).x0
        # q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2): alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
        a_ts = cur.alpha / nxt.alpha
        var_ts = cur.sigma**2 - a_ts**2 * nxt.sigma**2
        # mu = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0
        mean = (a_ts * nxt.sigma**2 / cur.sigma**2) * x + (nxt.alpha * var_ts / cur.sigma**2) * x0
        if nxt.clean:
            return mean, x0
        var = var_ts if self.variance == "beta" else var_ts * nxt.sigma**2 / cur.sigma**2
        # x_s = mu + sigma z
        return mean + math.sqrt(var) * noise_like(x, noise), x0

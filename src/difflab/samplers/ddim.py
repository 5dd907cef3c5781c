"""DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""

from __future__ import annotations

import math

from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.samplers.base import Noise, Sampler, noise_like
from difflab.samplers.grids import check_settings, spaced
from difflab.schedules import NoiseSchedule


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(self, steps: int = 25, eta: float = 0.0, spacing: str = "trailing", clip_x0: bool = True) -> None:
        check_settings(steps, spacing, eta)
        self.steps = steps
        self.eta = eta
        self.spacing = spacing
        self.clip_x0 = clip_x0

    def times(self, schedule: NoiseSchedule) -> list[float]:
        return spaced(schedule, self.steps, self.spacing)

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        den = self.read(x, denoise, cur)  # clipped: the direction term uses the eps consistent with the clipped x_0
        # sigma_eta^2 = eta^2 sigma_{t|s}^2 sigma_s^2 / sigma_t^2, sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2
        # (on a VP schedule eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s), the paper's)
        var_ts = cur.sigma**2 - (cur.alpha / nxt.alpha) ** 2 * nxt.sigma**2
        sigma = self.eta * math.sqrt(max(var_ts, 0.0) * nxt.sigma**2 / cur.sigma**2)
        # x_s = alpha_s x_0 + sqrt(sigma_s^2 - sigma_eta^2) eps + sigma_eta z
        x_next = nxt.alpha * den.x0 + math.sqrt(max(nxt.sigma**2 - sigma**2, 0.0)) * den.eps
        if self.eta > 0 and not nxt.clean:
            x_next = x_next + sigma * noise_like(x, noise)
        return x_next, den.x0

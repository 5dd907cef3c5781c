"""The vocabulary every room shares: a noise level, and what a denoiser says about an image at one.

x_t = alpha_t x_0 + sigma_t eps with t in [0, 1]: t = 0 is the clean image (alpha = 1, sigma = 0), t = 1 the noisiest
level a schedule has. A schedule (schedules.py) maps t to a Level; a sampler (samplers/) walks a decreasing grid of them;
a model's denoiser (model.py: the network, guided, read by its objective) returns Denoised: its x_0 and eps at one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass(frozen=True)
class Level:
    """One noise level, as plain floats (float64): the samplers' arithmetic takes them as constants, also in a traced
    graph. ``net_t``: the network's time input there (a VP schedule's 0-based step index, fractional between steps)."""

    t: float
    alpha: float
    sigma: float
    net_t: float

    @property
    def clean(self) -> bool:
        return self.sigma == 0

    @property
    def lam(self) -> float:
        # lambda = log(alpha / sigma), half the log-SNR (DPM-Solver's time); -inf at pure noise, inf at the clean image
        if self.alpha == 0:
            return -math.inf
        return math.log(self.alpha) - math.log(self.sigma) if self.sigma > 0 else math.inf

    @property
    def edm_sigma(self) -> float:
        # EDM's noise level sigma / alpha (Karras et al. 2022): x_t / alpha = x_0 + (sigma / alpha) eps
        return self.sigma / self.alpha if self.alpha > 0 else math.inf


@dataclass
class Denoised:
    """A denoiser's reading of x_t at a level: x_0 and eps with x_t = alpha x_0 + sigma eps, each computed from the
    network's own output by its objective (objectives/)."""

    x0: Tensor
    eps: Tensor

    def clipped(self, x: Tensor, level: Level) -> Denoised:
        # x_0 clipped to the data range, eps the one consistent with it: eps = (x_t - alpha x_0) / sigma
        x0 = self.x0.clamp(-1, 1)
        return Denoised(x0, (x - level.alpha * x0) / level.sigma)


# denoise(x_t, level) -> Denoised, with the conditioning, guidance and objective already bound (DiffusionModel.denoiser)
Denoiser = Callable[[Tensor, Level], Denoised]

"""Where training draws its noise levels (``objective.time``, conf/objective/time/): t uniform over the schedule's
range, logit-normal (Esser et al. 2024, SD3: t = sigmoid(loc + scale n)) or EDM's log-normal noise level
(Karras et al. 2022: ln(sigma / alpha) ~ N(p_mean, p_std^2)). Each returns t (B,) float64 on ``device``, inside the
schedule's [t_min, t_max]."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule
from difflab.validate import number


class TimeDistribution(ABC):
    @abstractmethod
    def sample(self, schedule: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        """t (batch,), float64."""


class UniformTime(TimeDistribution):
    """t ~ U(t_min, t_max); on a grid schedule its steps, each equally likely (DDPM's t ~ Uniform{1, ..., T})."""

    def sample(self, schedule: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        return schedule.sample_uniform(batch, device)

    def __repr__(self) -> str:
        return "UniformTime()"


class LogitNormal(TimeDistribution):
    """t = sigmoid(loc + scale n), n ~ N(0, 1): more draws at the middle levels (SD3's rectified flow: loc 0, scale 1)."""

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        self.loc = number("objective.time.loc", loc, hint=" (SD3: 0)")
        self.scale = number("objective.time.scale", scale, 1e-3, hint=" (SD3: 1)")

    def sample(self, schedule: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        n = torch.randn(batch, dtype=torch.float64)
        return torch.sigmoid(self.loc + self.scale * n).clamp(schedule.t_min, schedule.t_max).to(device)

    def __repr__(self) -> str:
        return f"LogitNormal(loc={self.loc:g}, scale={self.scale:g})"


class LogNormal(TimeDistribution):
    """ln sigma ~ N(p_mean, p_std^2) for EDM's noise level sigma = sigma_t / alpha_t, t the schedule's (clamped to its
    range)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.p_mean = number("objective.p_mean", p_mean, hint=" (EDM: -1.2)")
        self.p_std = number("objective.p_std", p_std, 1e-6, hint=" (EDM: 1.2)")

    def sample(self, schedule: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        log_sigma = torch.randn(batch, dtype=torch.float64) * self.p_std + self.p_mean
        return schedule.t_of_sigma(log_sigma.exp().to(schedule.device)).to(device)

    def __repr__(self) -> str:
        return f"LogNormal(p_mean={self.p_mean:g}, p_std={self.p_std:g})"

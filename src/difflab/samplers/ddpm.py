"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.base import Sampler, noise_like
from difflab.schedules import NoiseSchedule

VARIANCES = ("beta", "posterior")


class DDPMSampler(Sampler):
    """Every one of the T steps. variance="beta": sigma_t^2 = beta_t; "posterior": beta~_t."""

    def __init__(self, variance: str = "beta", clip_x0: bool = False) -> None:
        if variance not in VARIANCES:
            raise ConfigError(f"unknown DDPM variance {variance!r}; choose one of {VARIANCES}")
        self.variance = variance
        self.clip_x0 = clip_x0

    def timesteps(self, T: int) -> list[int]:
        return list(range(T - 1, -1, -1))

    def step(self, s: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        x0 = self.predict_x0(s, x_t, t, eps)
        if self.clip_x0:
            # mu from the clipped x_0: mu = c1 x_0 + c2 x_t (equal to the eps form below without clipping)
            mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x_t
        else:
            # mu = 1/sqrt(a_t) (x_t - b_t / sqrt(1 - ab_t) eps)
            mean = (x_t - s.betas[t] / s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.alphas[t].sqrt()
        if t == 0:
            return mean, x0
        var = s.betas[t] if self.variance == "beta" else s.posterior_variance[t]
        # x_{t-1} = mu + sigma_t z
        return mean + var.sqrt() * noise_like(x_t, generator), x0

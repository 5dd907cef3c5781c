"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2)."""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion import q_posterior
from difflab.errors import ConfigError
from difflab.samplers.base import Noise, Sampler, at, noise_like
from difflab.schedules import NoiseSchedule

VARIANCES = ("beta", "posterior")


class DDPMSampler(Sampler):
    """Every one of the T steps. variance="beta": sigma_t^2 = beta_t; "posterior": beta~_t."""

    name = "ddpm"

    def __init__(self, variance: str = "beta", clip_x0: bool = False) -> None:
        if variance not in VARIANCES:
            raise ConfigError(f"unknown DDPM variance {variance!r}; choose one of {VARIANCES}")
        self.variance = variance
        self.clip_x0 = clip_x0

    def timesteps(self, T: int) -> list[int]:
        return list(range(T - 1, -1, -1))

    def step(self, s: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, generator: Noise | None) -> tuple[Tensor, Tensor]:
        x0 = self.predict_x0(s, x_t, t, eps)
        if self.clip_x0:
            # mu from the clipped x_0: the posterior mean of q(x_{t-1} | x_t, x_0) (the eps form below without clipping)
            mean = q_posterior(s, x0, x_t, at(t, x_t))[0]
        else:
            # mu = 1/sqrt(a_t) (x_t - b_t / sqrt(1 - ab_t) eps)
            mean = (x_t - s.betas[t] / s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.alphas[t].sqrt()
        if t == 0:
            return mean, x0
        var = s.betas[t] if self.variance == "beta" else s.posterior_variance[t]
        # x_{t-1} = mu + sigma_t z
        return mean + var.sqrt() * noise_like(x_t, generator), x0

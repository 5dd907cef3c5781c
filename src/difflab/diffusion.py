"""The forward process and its posterior: pure tensor math on a NoiseSchedule (the loss: objectives/).

Shapes: x_0, x_t, eps are (B, C, H, W); t is an integer tensor (B,) in [0, T-1].
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule, extract

# eps_theta(x_t, t) -> eps, with any conditioning already bound
Denoiser = Callable[[Tensor, Tensor], Tensor]


def _coef(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    # the float64 schedule's coefficient at t, rounded once to x's dtype (the samplers' math stays in float32)
    return extract(values, t, x.ndim).to(x.dtype)


def q_sample(s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    # x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    return extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0 + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise


def predict_x0_from_eps(s: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    # x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t): the difference first, where both terms are O(1) (the form
    # sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps cancels two terms of order 1/sqrt(ab_t) ~ 1e2 near t = T-1)
    return (x_t - _coef(s.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _coef(s.sqrt_alphas_cumprod, t, x_t)


def predict_eps_from_x0(s: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    # eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t)
    return (x_t - _coef(s.sqrt_alphas_cumprod, t, x_t) * x0) / _coef(s.sqrt_one_minus_alphas_cumprod, t, x_t)


def q_posterior(s: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    # mu = beta_t sqrt(ab_{t-1}) / (1 - ab_t) x_0 + (1 - ab_{t-1}) sqrt(a_t) / (1 - ab_t) x_t
    mean = _coef(s.posterior_mean_coef1, t, x_t) * x0 + _coef(s.posterior_mean_coef2, t, x_t) * x_t
    var = extract(s.posterior_variance, t, x_t.ndim)
    log_var = extract(s.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, var, log_var


def sample_timesteps(batch: int, timesteps: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    # t ~ Uniform{0, ..., T-1}
    return torch.randint(0, timesteps, (batch,), device=device, generator=generator)

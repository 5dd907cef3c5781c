"""Noise schedules: beta_t for t in [0, T-1] and every quantity derived from it.

Index convention: t = 0 is the first noising step (x_0 -> x_1 in the paper's 1-based notation) and
t = T-1 the last, so ``alphas_cumprod[t]`` is the paper's alpha_bar_{t+1}. A network is always called
with the 0-based t. ``alphas_cumprod_prev[0] = 1`` (the clean image).

All tensors are computed in float64 and stored as float32 non-persistent buffers: they follow the
module across devices, are rebuilt from the config instead of being saved, and are never trained or
weight-averaged (EMA callbacks are configured with ``use_buffers=False``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.errors import ConfigError


class NoiseSchedule(nn.Module):
    """All terms of q(x_t | x_0) and q(x_{t-1} | x_t, x_0) for a given beta sequence (shape (T,))."""

    def __init__(self, betas: Tensor) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ConfigError(
                f"a noise schedule needs at least 2 timesteps, got {betas.numel()}: set timesteps=T with T >= 2"
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            bad = betas[(betas <= 0) | (betas >= 1)]
            raise ConfigError(
                f"every beta must lie in (0, 1); got {bad.numel()} outside, e.g. {bad[0].item():.4g}. "
                "Check schedule.beta_start / schedule.beta_end (e.g. beta_start=1e-4 beta_end=0.02)."
            )
        # alpha_t = 1 - beta_t ; alpha_bar_t = prod_{s<=t} alpha_s
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # posterior q(x_{t-1}|x_t,x_0): var = beta_t (1 - ab_{t-1}) / (1 - ab_t)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        terms = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # var_0 = 0, so the log is clipped to var_1 (as in Ho et al.'s code)
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            # mean = coef1 x_0 + coef2 x_t
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in terms.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def extra_repr(self) -> str:
        return f"T={self.timesteps}, alpha_bar[T-1]={self.alphas_cumprod[-1].item():.3g}"


# The one map between a VP step t and EDM's noise level sigma_t = sqrt(1 - ab_t) / sqrt(ab_t): at the trained steps
# exactly, between them linear in log sigma (as diffusers' Karras-sigma schedulers interpolate), both directions.


def vp_sigmas(s: NoiseSchedule) -> Tensor:
    """sigma_t for t = 0..T-1, float64 (T,), from the terms the schedule computed in float64 (1 - ab_t from a float32
    ab_t would lose 3 digits at t = 0)."""
    return s.sqrt_one_minus_alphas_cumprod.double() / s.sqrt_alphas_cumprod.double()


def sigma_to_t(s: NoiseSchedule, sigma: Tensor | float) -> Tensor:
    """The fractional step whose noise level is ``sigma`` (float64, on the schedule's device), clamped to [0, T-1]."""
    log_sigmas = vp_sigmas(s).log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=log_sigmas.device).log().clamp(log_sigmas[0], log_sigmas[-1])
    lo = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    return lo + (log_sigma - log_sigmas[lo]) / (log_sigmas[lo + 1] - log_sigmas[lo])


def signal_noise_at(s: NoiseSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(ab_t), sqrt(1 - ab_t)) in float64, shape (B,), at integer or fractional t (the inverse of sigma_to_t)."""
    log_sigma = vp_sigmas(s).log()
    t = t.double().to(log_sigma.device)
    lo = t.floor().long().clamp(0, len(log_sigma) - 2)
    sigma = (log_sigma[lo] + (t - lo) * (log_sigma[lo + 1] - log_sigma[lo])).exp()
    a = (1 + sigma**2).rsqrt()
    return a, sigma * a


def extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] (shape (B,)) reshaped to (B, 1, ..., 1) to broadcast over an ndim-dimensional batch."""
    return values.gather(0, t.long()).reshape(t.shape[0], *([1] * (ndim - 1)))


class LinearSchedule(NoiseSchedule):
    """Ho et al. (2020): beta_t = linspace(beta_start, beta_end, T)."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        _check_timesteps(timesteps)
        # beta_t = beta_start + (beta_end - beta_start) t / (T - 1)
        super().__init__(torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64))


class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    Same construction as diffusers' ``squaredcos_cap_v2``.
    """

    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        _check_timesteps(timesteps)
        step = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((step + s) / (1 + s) * math.pi / 2) ** 2
        # beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), max_beta)
        super().__init__((1.0 - f[1:] / f[:-1]).clamp(max=max_beta))


def _check_timesteps(timesteps: int) -> None:
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
        raise ConfigError(f"timesteps must be an integer >= 2, got {timesteps!r} (e.g. timesteps=1000)")

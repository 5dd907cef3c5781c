"""Noise schedules: t in [0, 1] -> (alpha_t, sigma_t), with x_t = alpha_t x_0 + sigma_t eps (conf/schedule/).

Peers, none a mapping into another:
- VPSchedule: variance preserving on a T-step grid, exact DDPM (Ho et al. 2020; linear betas, or Nichol & Dhariwal's
  cosine). Grid point k = 0 .. T-1 (DDPM's 0-based step, the network's time input) sits at t = (k + 1) / T with
  alpha^2 = alpha_bar_k = prod_{j<=k} (1 - beta_j); between grid points log(sigma / alpha) is linear in t (as EDM and
  diffusers' Karras-sigma schedulers interpolate), below the first one there is only the clean image at t = 0.
- RectifiedFlow: alpha = 1 - t, sigma = t (Liu et al. 2023; the path of SD3 and Flux).
- EDMSchedule: alpha = 1, sigma = sigma_max t^rho (Karras et al. 2022): uniform steps in t are EDM's rho-spaced sigmas.

Each gives its noise levels (difflab.diffusion.Level) in float64, the network's time input at t, the range samplers and
training use ([t_min, t_max]), and the coordinates in which Heun integrates the probability-flow ODE (``ode``). The VP
terms are float64 non-persistent buffers: they follow the module across devices, are rebuilt from the config instead of
being saved, and are never trained or weight-averaged (EMA callbacks use ``use_buffers=False``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.diffusion import Level
from difflab.errors import ConfigError
from difflab.validate import number

ON_GRID = 1e-9  # |t T - 1 - k| below this: grid point k exactly (t = (k + 1) / T carries float64 rounding)
NET_TIME_SCALE = 1000.0  # a continuous schedule's network time input: 1000 t, the range of a T = 1000 VP schedule's steps


class NoiseSchedule(nn.Module):
    """What every schedule offers. Subclasses define ``alpha_sigma``, ``net_time`` and ``t_of_sigma`` on float64 tensors."""

    timesteps: int | None = None  # T of a schedule defined on a grid; None for a continuous one
    t_min: float = 0.0  # the least noisy level that training draws and a sampler's grid visits (> 0)
    t_max: float = 1.0  # the noisiest

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t), float64, the shape of t; t = 0 gives (1, 0)."""
        raise NotImplementedError

    def net_time(self, t: Tensor) -> Tensor:
        """The network's time input at t (float64)."""
        raise NotImplementedError

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        """The t whose EDM noise level sigma_t / alpha_t is ``sigma`` (float64), clamped to [t_min, t_max]."""
        raise NotImplementedError

    def ode(self, level: Level) -> tuple[float, float]:
        """(scale s, time tau) of the coordinates y = x_t / s in which Heun integrates the probability-flow ODE: EDM's
        y = x_t / alpha = x_0 + tau eps with tau = sigma / alpha, unless the schedule has straighter ones."""
        return level.alpha, level.edm_sigma

    def t_of_tau(self, tau: float) -> float:
        """The inverse of ``ode``'s tau."""
        return float(self.t_of_sigma(tau))

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers()), torch.zeros(())).device

    def level(self, t: float) -> Level:
        """The noise level at t (0: the clean image)."""
        tt = torch.tensor([float(t)], dtype=torch.float64, device=self.device)
        a, s = self.alpha_sigma(tt)
        return Level(float(t), float(a), float(s), float(self.net_time(tt)))

    def coefs(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) per row of a batch x, shaped (B, 1, ..., 1) to broadcast, float64 on x's device: what the
        objectives combine in float64 and round once to x's dtype."""
        shape = (-1, *([1] * (x.ndim - 1)))
        return tuple(c.reshape(shape).to(x.device) for c in self.alpha_sigma(t.to(self.device)))

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        # x_t = alpha_t x_0 + sigma_t eps, the coefficients rounded once to x_0's dtype
        a, s = self.coefs(t, x0)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise

    def sample_uniform(self, batch: int, device: torch.device | str) -> Tensor:
        """t uniform over the trained range: U(t_min, t_max) (a grid schedule: its steps, each equally likely)."""
        u = torch.rand(batch, dtype=torch.float64, device=device)
        return self.t_min + u * (self.t_max - self.t_min)

    def from_unit(self, u: Tensor) -> Tensor:
        """u in [0, 1) -> t, increasing: validation's fixed draws (a grid schedule: its step floor(u T))."""
        return self.t_min + u.double() * (self.t_max - self.t_min)

    def extra_repr(self) -> str:
        top = self.level(self.t_max)
        return f"t in [{self.t_min:.4g}, {self.t_max:.4g}], alpha(t_max)={top.alpha:.3g}"


class VPSchedule(NoiseSchedule):
    """Variance preserving, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps, on the grid of a beta sequence (T,)."""

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
        self.timesteps = int(betas.numel())  # a plain int: grids are planned from it (also while a graph is traced)
        self.t_min = 1.0 / self.timesteps
        # alpha_bar_k = prod_{j<=k} (1 - beta_j)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        terms = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            # from 1 - alpha_bar in float64: from a float32 alpha_bar it would lose 3 digits at k = 0
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # log of EDM's sigma_k = sqrt(1 - ab_k) / sqrt(ab_k): what t interpolates between grid points
            "log_sigmas": 0.5 * ((1.0 - alphas_cumprod).log() - alphas_cumprod.log()),
        }
        for name, value in terms.items():
            self.register_buffer(name, value, persistent=False)

    def _index(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(u, k): the fractional step u = t T - 1 and the grid point k it is (-1 where it is none)."""
        u = t.double() * self.timesteps - 1
        k = u.round()
        return u, torch.where(((u - k).abs() <= ON_GRID) & (k >= 0) & (k < self.timesteps), k, -1).long()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u, k = self._index(t)
        uc = u.clamp(0, self.timesteps - 1)
        lo = uc.floor().long().clamp(max=self.timesteps - 2)
        # log sigma_edm linear between the grid points; alpha = 1 / sqrt(1 + sigma_edm^2), sigma = sigma_edm alpha
        sigma_edm = (self.log_sigmas[lo] + (uc - lo) * (self.log_sigmas[lo + 1] - self.log_sigmas[lo])).exp()
        a = (1 + sigma_edm**2).rsqrt()
        s = sigma_edm * a
        on = k >= 0
        a = torch.where(on, self.sqrt_alphas_cumprod[k.clamp(min=0)], a)
        s = torch.where(on, self.sqrt_one_minus_alphas_cumprod[k.clamp(min=0)], s)
        clean = t <= 0
        return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)

    def net_time(self, t: Tensor) -> Tensor:
        u, k = self._index(t)
        return torch.where(k >= 0, k.double(), u.clamp(0, self.timesteps - 1))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.log_sigmas.device).log()
        log_sigma = log_sigma.clamp(self.log_sigmas[0], self.log_sigmas[-1])
        lo = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.timesteps - 2)
        u = lo + (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[lo + 1] - self.log_sigmas[lo])
        return (u + 1) / self.timesteps

    def level_at(self, k: int) -> Level:
        """Grid point k (-1: the clean image)."""
        return self.level((k + 1) / self.timesteps)

    def sample_uniform(self, batch: int, device: torch.device | str) -> Tensor:
        # k ~ Uniform{0, ..., T-1}, t = (k + 1) / T
        return (torch.randint(0, self.timesteps, (batch,), device=device) + 1).double() / self.timesteps

    def from_unit(self, u: Tensor) -> Tensor:
        # k = floor(u T), in u's own precision
        return ((u * self.timesteps).long().clamp(max=self.timesteps - 1) + 1).double() / self.timesteps

    def extra_repr(self) -> str:
        return f"T={self.timesteps}, alpha_bar[T-1]={float(self.alphas_cumprod[-1]):.3g}"


class LinearSchedule(VPSchedule):
    """Ho et al. (2020): beta_t = linspace(beta_start, beta_end, T)."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        _check_timesteps(timesteps)
        # beta_t = beta_start + (beta_end - beta_start) t / (T - 1)
        super().__init__(torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64))


class CosineSchedule(VPSchedule):
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    Same construction as diffusers' ``squaredcos_cap_v2``.
    """

    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        _check_timesteps(timesteps)
        step = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((step + s) / (1 + s) * math.pi / 2) ** 2
        # beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), max_beta)
        super().__init__((1.0 - f[1:] / f[:-1]).clamp(max=max_beta))


class RectifiedFlow(NoiseSchedule):
    """alpha = 1 - t, sigma = t: the straight line from the data to the noise (Liu et al. 2023; Lipman et al. 2023's
    optimal-transport path). Heun integrates in (x_t, t) itself, where x_t = (1 - t) x_0 + t eps is a straight line."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0) -> None:
        super().__init__()
        self.t_min = number("schedule.t_min", t_min, 1e-6, 0.5, " (the least noisy level trained and sampled, e.g. 1e-3)")
        self.t_max = number("schedule.t_max", t_max, 0.5, 1.0, " (1: pure noise, where alpha = 0)")

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.double()
        return 1 - t, t

    def net_time(self, t: Tensor) -> Tensor:
        return NET_TIME_SCALE * t.double()

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        # sigma / alpha = t / (1 - t)  ->  t = sigma / (1 + sigma)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.where(sigma.isinf(), torch.ones_like(sigma), sigma / (1 + sigma)).clamp(self.t_min, self.t_max)

    def ode(self, level: Level) -> tuple[float, float]:
        return 1.0, level.t

    def t_of_tau(self, tau: float) -> float:
        return min(max(tau, self.t_min), self.t_max)


class EDMSchedule(NoiseSchedule):
    """alpha = 1, sigma_t = sigma_max t^rho: EDM's x = x_0 + sigma n (Karras et al. 2022), its rho-spaced noise levels
    uniform in t; t_min = (sigma_min / sigma_max)^(1/rho)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        super().__init__()
        self.sigma_max = number("schedule.sigma_max", sigma_max, 1e-3, hint=" (EDM: 80)")
        self.sigma_min = number("schedule.sigma_min", sigma_min, 1e-6, self.sigma_max / 2, " (EDM: 0.002)")
        self.rho = number("schedule.rho", rho, 1.0, 20.0, " (EDM: 7)")
        self.t_min = (self.sigma_min / self.sigma_max) ** (1 / self.rho)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.double()
        return torch.ones_like(t), self.sigma_max * t.clamp(min=0) ** self.rho

    def net_time(self, t: Tensor) -> Tensor:
        return NET_TIME_SCALE * t.double()

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (sigma / self.sigma_max).clamp(min=0).pow(1 / self.rho).clamp(self.t_min, self.t_max)

    def extra_repr(self) -> str:
        return f"sigma in [{self.sigma_min:g}, {self.sigma_max:g}], rho={self.rho:g}"


def _check_timesteps(timesteps: int) -> None:
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
        raise ConfigError(f"timesteps must be an integer >= 2, got {timesteps!r} (e.g. timesteps=1000)")

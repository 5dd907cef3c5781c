"""DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 matches DDPM's variance."""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion import predict_eps_from_x0
from difflab.samplers.base import Noise, Sampler, alpha_bar, at, check_settings, noise_like, spaced_timesteps
from difflab.schedules import NoiseSchedule


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(self, steps: int = 25, eta: float = 0.0, spacing: str = "trailing", clip_x0: bool = True) -> None:
        check_settings(steps, spacing, eta)
        self.steps = steps
        self.eta = eta
        self.spacing = spacing
        self.clip_x0 = clip_x0

    def timesteps(self, T: int) -> list[int]:
        return spaced_timesteps(T, self.steps, self.spacing)

    def step(self, s: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, generator: Noise | None) -> tuple[Tensor, Tensor]:
        ab, ab_prev = alpha_bar(s, t), alpha_bar(s, t_prev)
        x0 = self.predict_x0(s, x_t, t, eps)
        if self.clip_x0:
            # the direction term uses the eps consistent with the clipped x_0: eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t)
            eps = predict_eps_from_x0(s, x_t, at(t, x_t), x0)
        # sigma_t = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        # x_prev = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * noise_like(x_t, generator)
        return x_prev, x0

"""Multistep consistency sampling (Song et al. 2023, Algorithm 1), for consistency models only (objectives.Consistency).

x_0 = f(x_t, t) at the first step, then for each further t: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) z with fresh noise z,
x_0 = f(x_t, t). One network call per step: the guidance is in the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.base import Noise, Sampler, alpha_bar, check_settings, noise_like
from difflab.schedules import NoiseSchedule
from difflab.validate import number

MAX_STEPS = 8  # each step re-noises the last x_0 and loses detail; past a few, sample the diffusion model it was tuned from


class ConsistencySampler(Sampler):
    name = "consistency"

    def __init__(self, steps: int = 2, rho: float = 1.0, timesteps: Sequence[int] | None = None, clip_x0: bool = True) -> None:
        check_settings(steps)
        self.rho = number("sampler.rho", rho, 0.1, 10, " (1: evenly spaced steps; larger: the later steps at lower noise)")
        if steps > MAX_STEPS:
            raise ConfigError(f"steps={steps}: consistency sampling takes 1 to {MAX_STEPS} steps (each re-noises the last "
                              "sample); for more, sample the diffusion model it was tuned from")
        self.steps = steps
        self.at = [int(t) for t in timesteps] if timesteps is not None else None
        if self.at is not None and (len(self.at) != steps or self.at != sorted(set(self.at), reverse=True)):
            raise ConfigError(f"sampler.timesteps={list(timesteps)}: give {steps} decreasing timesteps (one per step), "
                              "or null for the rho spacing")
        self.clip_x0 = clip_x0

    def timesteps(self, T: int) -> list[int]:
        if self.at is None:
            # t_i = round((T - 1) (1 - i / steps)^rho), i = 0 .. steps-1: step i starts from a noise level that shrinks with rho
            ts = [round((T - 1) * (1 - i / self.steps) ** self.rho) for i in range(self.steps)]
            if len(set(ts)) < len(ts):
                raise ConfigError(f"steps={self.steps} with rho={self.rho} repeats timesteps on T={T}: use fewer steps or a smaller rho")
            return ts
        if not (0 <= self.at[-1] and self.at[0] < T):
            raise ConfigError(f"sampler.timesteps={self.at}: each must lie in [0, T-1={T - 1}]")
        return self.at

    def step(self, s: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, generator: Noise | None) -> tuple[Tensor, Tensor]:
        x0 = self.predict_x0(s, x_t, t, eps)  # f(x_t, t)
        if t_prev < 0:
            return x0, x0
        ab = alpha_bar(s, t_prev)
        # x_{t'} = sqrt(ab_t') x_0 + sqrt(1 - ab_t') z
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise_like(x_t, generator), x0


"""Multistep consistency sampling (Song et al. 2023, Algorithm 1), for consistency models only (objectives.Consistency).

x_0 = f(x_t, t) at the first step, then for each further t: x_t = alpha_t x_0 + sigma_t z with fresh noise z,
x_0 = f(x_t, t). One network call per step: the guidance is in the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.errors import ConfigError
from difflab.samplers.base import Noise, Sampler, noise_like
from difflab.samplers.grids import check_settings
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

    def times(self, schedule: NoiseSchedule) -> list[float]:
        T = schedule.timesteps
        fractions = [(1 - i / self.steps) ** self.rho for i in range(self.steps)]
        if T is None:
            if self.at is not None:
                raise ConfigError("sampler.timesteps are steps of a T-step schedule; this one is continuous: use null (rho spacing)")
            # t_i = t_min + (t_max - t_min) (1 - i / steps)^rho
            return [schedule.t_min + (schedule.t_max - schedule.t_min) * f for f in fractions]
        if self.at is None:
            # step k_i = round((T - 1) (1 - i / steps)^rho): step i starts from a noise level that shrinks with rho
            ks = [round((T - 1) * f) for f in fractions]
            if len(set(ks)) < len(ks):
                raise ConfigError(f"steps={self.steps} with rho={self.rho} repeats timesteps on T={T}: use fewer steps or a smaller rho")
        else:
            if not (0 <= self.at[-1] and self.at[0] < T):
                raise ConfigError(f"sampler.timesteps={self.at}: each must lie in [0, T-1={T - 1}]")
            ks = self.at
        return [(k + 1) / T for k in ks]

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        x0 = self.read(x, denoise, cur).x0  # f(x_t, t)
        if nxt.clean:
            return x0, x0
        # x_s = alpha_s x_0 + sigma_s z
        return nxt.alpha * x0 + nxt.sigma * noise_like(x, noise), x0

"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2) on any model of the project, through the VP <-> EDM map.

A VP model sees x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps; EDM's variable is x = x_t / sqrt(ab_t) = x_0 + sigma eps
with sigma_t = sqrt((1 - ab_t) / ab_t). The denoiser D(x; sigma) = x - sigma eps_theta(x / sqrt(1 + sigma^2), t(sigma)),
t(sigma) interpolated in log sigma between the trained steps (as diffusers' Heun/Karras schedulers do).
Karras sigmas: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0;
defaults sigma_max = sigma_{T-1}, sigma_min = sigma_0. 2N - 1 network evaluations (Euler on the last step).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from difflab.diffusion import Denoiser
from difflab.samplers.base import Noise, SampleOutput, Sampler, _progress, check_settings, noise_like
from difflab.schedules import NoiseSchedule, sigma_to_t, vp_sigmas
from difflab.validate import number


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, steps)
    return np.append((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho, 0.0)


class HeunSampler(Sampler):
    """steps N (2N - 1 evaluations); churn S_churn with S_tmin, S_tmax, S_noise as in EDM (churn 0: deterministic)."""

    name = "heun"
    clip_x0 = False

    def __init__(self, steps: int = 18, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None,
                 churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> None:
        check_settings(steps)
        number("sampler.rho", rho, 1e-3, hint=" (EDM: 7)")
        number("sampler.churn", churn, 0, hint=" (0: deterministic; EDM uses 0-80)")
        self.steps, self.rho, self.sigma_min, self.sigma_max = steps, rho, sigma_min, sigma_max
        self.churn, self.s_tmin, self.s_tmax, self.s_noise = churn, s_tmin, s_tmax, s_noise

    def sigmas(self, s: NoiseSchedule) -> np.ndarray:
        trained = vp_sigmas(s)
        return karras_sigmas(self.steps, self.sigma_min or float(trained[0]), self.sigma_max or float(trained[-1]), self.rho)

    def timesteps(self, T: int) -> list[int]:
        return list(range(self.steps))  # one entry per step: what sample.py counts and records the chain by

    @torch.no_grad()
    def sample(self, denoise: Denoiser, s: NoiseSchedule, x_T: Tensor, generator: Noise | None = None, record_every: int = 0,
               progress: bool = False) -> SampleOutput:
        sigmas = self.sigmas(s)

        def D(x: Tensor, sigma: float) -> Tensor:
            # D(x; sigma) = x - sigma eps_theta(x / sqrt(1 + sigma^2), t(sigma))
            t = torch.full((x.shape[0],), float(sigma_to_t(s, sigma)), device=x.device)
            return x - sigma * denoise(x / math.sqrt(1 + sigma**2), t).float()

        x = x_T * sigmas[0]  # x_0 ~ N(0, sigma_max^2 I)
        out = SampleOutput(images=x_T)
        if record_every:
            out.chain.append(x_T.cpu()), out.chain_t.append(0)
        for i in _progress(range(self.steps), progress, "HeunSampler"):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            # gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]; sigma_hat = (1 + gamma) sigma
            gamma = min(self.churn / self.steps, math.sqrt(2) - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:  # x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise * noise_like(x, generator)
            x0 = D(x, sigma_hat)
            d = (x - x0) / sigma_hat  # dx/dsigma = (x - D(x; sigma)) / sigma
            x_next = x + (sigma_next - sigma_hat) * d
            if sigma_next > 0:  # Heun's correction: the mean of the slopes at both ends
                x0 = D(x_next, sigma_next)
                x_next = x + (sigma_next - sigma_hat) * (d + (x_next - x0) / sigma_next) / 2
            x = x_next
            if record_every and ((i + 1) % record_every == 0 or sigma_next == 0):
                # frames in the VP variable x_t = x / sqrt(1 + sigma^2), comparable with the other samplers' chains
                out.chain.append((x / math.sqrt(1 + sigma_next**2)).cpu()), out.x0_chain.append(x0.cpu()), out.chain_t.append(i + 1)
        out.images = x
        return out

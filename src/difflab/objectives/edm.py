"""EDM's preconditioning (Karras et al. 2022, Table 1) on the project's VP networks.

With x = x_0 + sigma n: D(x; sigma) = c_skip x + c_out F(c_in x, t(sigma)), c_skip = sd^2 / (sigma^2 + sd^2),
c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2); the network's time input is the VP step
t(sigma) (fractional, as for the Heun sampler) instead of c_noise = ln(sigma) / 4, so the UNet stays as it is.
Training: ln sigma ~ N(P_mean, P_std^2) (clipped to the schedule's range), loss lambda(sigma) |D - x_0|^2 =
|F - (x_0 - c_skip x) / c_out|^2. Not a Prediction: its network sees c_in x, not x_t, and has no weighting to choose.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion import Denoiser
from difflab.objectives.base import Objective, coefs
from difflab.schedules import NoiseSchedule, sigma_to_t
from difflab.validate import number


class EDMPreconditioning(Objective):
    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.sigma_data = number("objective.sigma_data", sigma_data, 1e-6, hint=" (EDM: 0.5 for images in [-1, 1])")
        self.p_mean = number("objective.p_mean", p_mean, hint=" (EDM: -1.2)")
        self.p_std = number("objective.p_std", p_std, 1e-6, hint=" (EDM: 1.2)")

    def __repr__(self) -> str:
        return f"EDMPreconditioning(sigma_data={self.sigma_data}, p_mean={self.p_mean}, p_std={self.p_std})"

    def coefs(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        # c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt(), (sigma**2 + sd2).rsqrt()

    def sample_t(self, s: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        # ln sigma ~ N(P_mean, P_std^2); t = the fractional step of that sigma (inside the trained range)
        log_sigma = torch.randn(batch, dtype=torch.float64) * self.p_std + self.p_mean
        return sigma_to_t(s, log_sigma.exp()).float().to(device)

    def loss(self, net: Callable[..., Tensor], s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs: Any) -> Tensor:
        a, sig = coefs(s, t, x0)
        sigma = sig / a
        c_skip, c_out, c_in = self.coefs(sigma)
        x = x0 + sigma * noise  # EDM's variable
        out = net(c_in * x, t, **net_kwargs)
        return F.mse_loss(out.float(), (x0 - c_skip * x) / c_out, reduction="none").flatten(1).mean(1)

    def eps_denoiser(self, output: Denoiser, s: NoiseSchedule) -> Denoiser:
        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            a, sig = coefs(s, t, x_t)
            sigma = sig / a
            c_skip, c_out, c_in = self.coefs(sigma)
            x = x_t / a  # VP x_t -> EDM x = x_t / sqrt(ab_t)
            d = c_skip * x + c_out * output(c_in * x, t).float()
            return (x - d) / sigma  # eps = (x - D(x; sigma)) / sigma

        return eps

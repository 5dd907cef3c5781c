"""What the network predicts and how the loss weights the noise levels (conf/objective/). The network knows nothing
of schedules; the samplers always receive eps, converted here from the network's prediction.

With x_t = a x_0 + s eps, a = sqrt(ab_t), s = sqrt(1 - ab_t), SNR_t = a^2 / s^2:
  eps:  the noise (Ho et al. 2020);  x0: the clean image;  v = a eps - s x_0 (Salimans & Ho 2022).
Weighting of the per-sample MSE: uniform, or min-SNR-gamma (Hang et al. 2023): the x_0-space weight min(SNR, gamma),
i.e. min(SNR, gamma) / SNR on an eps loss, min(SNR, gamma) / (SNR + 1) on a v loss, min(SNR, gamma) on an x_0 loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion import Denoiser, q_sample, sample_timesteps
from difflab.errors import ConfigError
from difflab.schedules import NoiseSchedule, sigma_to_t, signal_noise_at
from difflab.validate import number

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr")


class Objective:
    def __init__(self, prediction: str = "eps", weighting: str = "uniform", snr_gamma: float = 5.0) -> None:
        if prediction not in PREDICTIONS:
            raise ConfigError(f"objective.prediction={prediction!r}: choose one of {', '.join(PREDICTIONS)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"objective.weighting={weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        number("objective.snr_gamma", snr_gamma, 1e-6, hint=" (Hang et al.: 5)")
        self.prediction, self.weighting, self.snr_gamma = prediction, weighting, snr_gamma

    def __repr__(self) -> str:
        return f"Objective(prediction={self.prediction}, weighting={self.weighting}, snr_gamma={self.snr_gamma})"

    def target(self, s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, sig = _coefs(s, t, x0)
        return a * noise - sig * x0  # v = a eps - s x_0

    def weight(self, s: NoiseSchedule, t: Tensor) -> Tensor:
        """(B,) loss weights; uniform = 1."""
        if self.weighting == "uniform":
            return torch.ones(t.shape[0], device=t.device)
        a, sig = signal_noise_at(s, t)
        snr = (a / sig) ** 2
        w_x0 = snr.clamp(max=self.snr_gamma)  # min(SNR, gamma)
        return (w_x0 / {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[self.prediction]).float()

    def loss(self, net: Callable[..., Tensor], s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs: Any) -> Tensor:
        """Per-sample weighted MSE (B,) between the network's output at x_t and this objective's target."""
        out = net(q_sample(s, x0, t, noise), t, **net_kwargs)
        mse = F.mse_loss(out.float(), self.target(s, x0, t, noise), reduction="none").flatten(1).mean(1)
        return mse * self.weight(s, t)

    def to_eps(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The network's output as eps (t may be fractional: EDM's sampler evaluates between trained steps)."""
        if self.prediction == "eps":
            return out
        a, sig = _coefs(s, t, x_t)
        if self.prediction == "x0":
            return (x_t - a * out) / sig  # eps = (x_t - a x_0) / s
        return sig * x_t + a * out  # eps = s x_t + a v

    def sample_t(self, s: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        # t ~ Uniform{0, ..., T-1}
        return sample_timesteps(batch, s.timesteps, torch.device(device))

    def eps_denoiser(self, denoise: Denoiser, s: NoiseSchedule) -> Denoiser:
        if self.prediction == "eps":
            return denoise
        return lambda x, t: self.to_eps(s, x, t, denoise(x, t).float())


class EDM(Objective):
    """EDM's preconditioning (Karras et al. 2022, Table 1) on the project's VP networks: with x = x_0 + sigma n,
    D(x; sigma) = c_skip x + c_out F(c_in x, t(sigma)), c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2); the network's time input is the VP step t(sigma) (fractional, as for the Heun
    sampler) instead of c_noise = ln(sigma) / 4, so the UNet stays as it is. Training: ln sigma ~ N(P_mean, P_std^2)
    (clipped to the schedule's range), loss lambda(sigma) ||D - x_0||^2 = ||F - (x_0 - c_skip x) / c_out||^2."""

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        number("objective.sigma_data", sigma_data, 1e-6, hint=" (EDM: 0.5 for images in [-1, 1])")
        number("objective.p_std", p_std, 1e-6, hint=" (EDM: 1.2)")
        number("objective.p_mean", p_mean, hint=" (EDM: -1.2)")
        self.prediction, self.weighting, self.snr_gamma = "edm", "edm", 0.0
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def __repr__(self) -> str:
        return f"EDM(sigma_data={self.sigma_data}, p_mean={self.p_mean}, p_std={self.p_std})"

    def coefs(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        # c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt(), (sigma**2 + sd2).rsqrt()

    def sample_t(self, s: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        # ln sigma ~ N(P_mean, P_std^2); t = the fractional step of that sigma (inside the trained range)
        log_sigma = torch.randn(batch, dtype=torch.float64) * self.p_std + self.p_mean
        return sigma_to_t(s, log_sigma.exp()).float().to(device)

    def loss(self, net: Callable[..., Tensor], s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs: Any) -> Tensor:
        a, sig = _coefs(s, t, x0)
        sigma = sig / a
        c_skip, c_out, c_in = self.coefs(sigma)
        x = x0 + sigma * noise  # EDM's variable
        out = net(c_in * x, t, **net_kwargs)
        return F.mse_loss(out.float(), (x0 - c_skip * x) / c_out, reduction="none").flatten(1).mean(1)

    def eps_denoiser(self, denoise: Denoiser, s: NoiseSchedule) -> Denoiser:
        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            a, sig = _coefs(s, t, x_t)
            sigma = sig / a
            c_skip, c_out, c_in = self.coefs(sigma)
            x = x_t / a  # VP x_t -> EDM x = x_t / sqrt(ab_t)
            d = c_skip * x + c_out * denoise(c_in * x, t).float()
            return (x - d) / sigma  # eps = (x - D(x; sigma)) / sigma
        return eps


def _coefs(s: NoiseSchedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    shape = (-1, *([1] * (x.ndim - 1)))
    return tuple(c.reshape(shape).to(x.device, x.dtype) for c in signal_noise_at(s, t))

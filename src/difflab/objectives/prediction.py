"""The network predicts eps, x_0 or v from x_t = a x_0 + s eps (a = sqrt(ab_t), s = sqrt(1 - ab_t)); the loss is the
per-sample MSE to that target, weighted by a Weighting (weighting.py)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion import Denoiser, q_sample
from difflab.objectives.base import Objective, coefs
from difflab.objectives.weighting import Uniform, Weighting
from difflab.schedules import NoiseSchedule


class Prediction(Objective):
    """A network that sees x_t and predicts ``target``; one subclass per target."""

    def __init__(self, weighting: Weighting | None = None) -> None:
        self.weighting = weighting or Uniform()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weighting={self.weighting!r})"

    @abstractmethod
    def target(self, s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network is trained to output at x_t."""

    @abstractmethod
    def to_eps(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The network's output as eps."""

    @abstractmethod
    def to_x0(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The network's output as x_0."""

    @abstractmethod
    def x0_units(self, snr: Tensor) -> Tensor:
        """The MSE of this target per unit of x_0 MSE at the same x_t (what min-SNR weighting divides by)."""

    def loss(self, net: Callable[..., Tensor], s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs: Any) -> Tensor:
        out = net(q_sample(s, x0, t, noise), t, **net_kwargs)
        mse = F.mse_loss(out.float(), self.target(s, x0, t, noise), reduction="none").flatten(1).mean(1)
        return mse * self.weighting(self, s, t)

    def eps_denoiser(self, output: Denoiser, s: NoiseSchedule) -> Denoiser:
        return lambda x, t: self.to_eps(s, x, t, output(x, t).float())


class EpsPrediction(Prediction):
    """The noise (Ho et al. 2020)."""

    def target(self, s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return noise

    def to_eps(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        return out

    def to_x0(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        a, sig = coefs(s, t, x_t)
        return (x_t - sig * out) / a  # x_0 = (x_t - s eps) / a

    def x0_units(self, snr: Tensor) -> Tensor:
        return snr  # |eps_hat - eps|^2 = SNR |x0_hat - x_0|^2

    def eps_denoiser(self, output: Denoiser, s: NoiseSchedule) -> Denoiser:
        return output


class X0Prediction(Prediction):
    """The clean image."""

    def target(self, s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return x0

    def to_eps(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        a, sig = coefs(s, t, x_t)
        return (x_t - a * out) / sig  # eps = (x_t - a x_0) / s

    def to_x0(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        return out

    def x0_units(self, snr: Tensor) -> Tensor:
        return snr.new_ones(snr.shape)


class VPrediction(Prediction):
    """v = a eps - s x_0 (Salimans & Ho 2022)."""

    def target(self, s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a, sig = coefs(s, t, x0)
        return a * noise - sig * x0  # v = a eps - s x_0

    def to_eps(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        a, sig = coefs(s, t, x_t)
        return sig * x_t + a * out  # eps = s x_t + a v

    def to_x0(self, s: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        a, sig = coefs(s, t, x_t)
        return a * x_t - sig * out  # x_0 = a x_t - s v

    def x0_units(self, snr: Tensor) -> Tensor:
        return snr + 1  # |v_hat - v|^2 = (SNR + 1) |x0_hat - x_0|^2

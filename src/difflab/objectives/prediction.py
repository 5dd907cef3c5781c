"""The network predicts eps (Ho et al. 2020), x_0, or v = alpha eps - sigma x_0 (Salimans & Ho 2022), of the
variance-preserving x_t / r with r = sqrt(alpha^2 + sigma^2) (r = 1 on a VP schedule; so on rectified flow, say, v is
the v of the same point's VP twin): alpha, sigma below are alpha / r, sigma / r."""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion import Denoised
from difflab.errors import ConfigError
from difflab.objectives.base import Coef, Objective, c
from difflab.schedules import NoiseSchedule


class EpsPrediction(Objective):
    """The noise (Ho et al. 2020)."""

    def check(self, schedule: NoiseSchedule) -> None:
        if schedule.level(schedule.t_max).alpha == 0:
            raise ConfigError("objective=eps cannot recover x_0 where alpha = 0 (pure noise, t = 1 of schedule=flow): use "
                              "objective=flow, v or x0, or keep the schedule off pure noise (schedule.t_max=0.999)")

    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        # x_0 = (x_t - sigma eps) / alpha: the difference first, where both terms are O(1) (x_t / alpha - (sigma / alpha)
        # eps would cancel two terms of order 1 / alpha ~ 1e2 near t = 1)
        return Denoised((x - c(s, x) * out) / c(a, x), out)

    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        return eps

    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        return (a / s) ** 2  # |eps_hat - eps|^2 = SNR |x0_hat - x_0|^2


class X0Prediction(Objective):
    """The clean image."""

    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        # eps = (x_t - alpha x_0) / sigma
        return Denoised(out, (x - c(a, x) * out) / c(s, x))

    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        return x0

    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        return a.new_ones(a.shape)


class VPrediction(Objective):
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022)."""

    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        r2 = a * a + s * s
        # x_0 = alpha (x_t / r) - sigma v, eps = sigma (x_t / r) + alpha v, with alpha / r and sigma / r
        return Denoised(c(a / r2, x) * x - c(s * r2**-0.5, x) * out, c(s / r2, x) * x + c(a * r2**-0.5, x) * out)

    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        r = (a * a + s * s) ** 0.5
        return c(a / r, x0) * eps - c(s / r, x0) * x0  # v = alpha eps - sigma x_0

    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        return (a * a + s * s) / (s * s)  # |v_hat - v|^2 = (SNR + 1) |x0_hat - x_0|^2

"""EDM's preconditioning (Karras et al. 2022, Table 1), on any schedule.

In EDM's variables x = x_t / alpha = x_0 + sigma_e n (sigma_e = sigma / alpha): D(x; sigma_e) = c_skip x + c_out F(c_in x),
c_skip = sd^2 / (sigma_e^2 + sd^2), c_out = sigma_e sd / sqrt(sigma_e^2 + sd^2), c_in = 1 / sqrt(sigma_e^2 + sd^2). Written
in x_t, alpha and sigma (finite at alpha = 0 too): the network sees x_t / sqrt(sigma^2 + alpha^2 sd^2) and
x_0 = alpha sd^2 / (sigma^2 + alpha^2 sd^2) x_t + sigma sd / sqrt(sigma^2 + alpha^2 sd^2) F. Its time input is the
schedule's (a VP schedule's fractional step) instead of c_noise = ln(sigma_e) / 4, so the UNet stays as it is.
Training: ln sigma_e ~ N(P_mean, P_std^2), loss lambda(sigma_e) |D - x_0|^2 = |F - (x_0 - c_skip x) / c_out|^2.
"""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion import Denoised
from difflab.objectives.base import Coef, Objective, c
from difflab.objectives.times import LogNormal, TimeDistribution
from difflab.validate import number


class EDMPreconditioning(Objective):
    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2, time: TimeDistribution | None = None) -> None:
        super().__init__(time=time or LogNormal(p_mean, p_std))
        self.sigma_data = number("objective.sigma_data", sigma_data, 1e-6, hint=" (EDM: 0.5 for images in [-1, 1])")

    def __repr__(self) -> str:
        return f"EDMPreconditioning(sigma_data={self.sigma_data}, time={self.time!r})"

    def coefs(self, a: Coef, s: Coef) -> tuple[Coef, Coef, Coef]:
        """(c_skip, c_out, c_in) on x_t: x_0 = c_skip x_t + c_out F(c_in x_t)."""
        sd, q = self.sigma_data, s * s + a * a * self.sigma_data**2
        return a * sd**2 / q, s * sd * q**-0.5, q**-0.5

    def net_input(self, x: Tensor, a: Coef, s: Coef) -> Tensor:
        return x * c(self.coefs(a, s)[2], x)

    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        c_skip, c_out, _ = self.coefs(a, s)
        x0 = c(c_skip, x) * x + c(c_out, x) * out  # D = c_skip x + c_out F
        return Denoised(x0, (x - c(a, x) * x0) / c(s, x))  # eps = (x_t - alpha x_0) / sigma

    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        c_skip, c_out, _ = self.coefs(a, s)
        x_t = c(a, x0) * x0 + c(s, x0) * eps
        return (x0 - c(c_skip, x0) * x_t) / c(c_out, x0)  # the F that makes D = x_0

    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        return self.coefs(a, s)[1] ** -2  # x_0 error = c_out F error

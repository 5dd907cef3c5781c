"""Flow matching (Lipman et al. 2023; Liu et al. 2023's rectified flow; the objective of SD3 and Flux): the network
predicts the velocity u = eps - x_0, the time derivative of x_t = (1 - t) x_0 + t eps on schedule=flow, from x_t itself.
On any other schedule u is the same combination of x_0 and eps (no longer dx_t/dt): x_0 and eps come back from
x_t = alpha x_0 + sigma eps and u as below, for any alpha + sigma > 0. The draws of t: objective/time=uniform
(the default) | logit_normal (SD3) | log_normal (EDM)."""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion import Denoised
from difflab.objectives.base import Coef, Objective, c


class FlowMatching(Objective):
    def net_input(self, x: Tensor, a: Coef, s: Coef) -> Tensor:
        return x  # x_t as it is, as flow-matching networks take it

    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        # x_0 = (x_t - sigma u) / (alpha + sigma), eps = (x_t + alpha u) / (alpha + sigma): on rectified flow x_t - t u and
        # x_t + (1 - t) u
        k = 1 / (a + s)
        return Denoised(c(k, x) * x - c(s * k, x) * out, c(k, x) * x + c(a * k, x) * out)

    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        return eps - x0  # u = eps - x_0

    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        return ((a + s) / s) ** 2  # x_0 = (x_t - sigma u) / (alpha + sigma): |u_hat - u| = (alpha + sigma) / sigma |x0_hat - x_0|

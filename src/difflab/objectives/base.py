"""What every objective is: one parameterization of the denoiser. Given x_t = alpha x_0 + sigma eps it says what the
network sees (``net_input``), how its output becomes x_0 and eps (``denoised``), what it is trained to output
(``target``), how the loss weights the noise levels (``weighting``) and where training draws them (``time``).

Coefficients are functions of (alpha, sigma), as Python floats (a sampler's level) or float64 tensors (a training batch,
(B, 1, ..., 1)); each is formed in float64 and rounded once to the images' dtype (``c``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion import Denoised, Denoiser, Level
from difflab.objectives.times import TimeDistribution, UniformTime
from difflab.objectives.weighting import Uniform, Weighting
from difflab.schedules import NoiseSchedule

Coef = float | Tensor
# output(network input, level) -> the (guided) network output at that level (difflab.guidance.Guidance.output)
Output = Callable[[Tensor, Level], Tensor]


def c(value: Coef, x: Tensor) -> Coef:
    """A float64 coefficient rounded once to x's dtype (a Python float: torch rounds it when it multiplies x)."""
    return value.to(x.dtype) if isinstance(value, Tensor) else value


class Objective(ABC):
    # the guidance scale trained into the network (a consistency model's), None for a plain diffusion model
    distilled_guidance: float | None = None

    def __init__(self, weighting: Weighting | None = None, time: TimeDistribution | None = None) -> None:
        self.weighting = weighting or Uniform()
        self.time = time or UniformTime()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weighting={self.weighting!r}, time={self.time!r})"

    def check(self, schedule: NoiseSchedule) -> None:  # noqa: B027 (most objectives read every schedule)
        """Refuses a schedule this parameterization cannot read (ConfigError naming the fix)."""

    def net_input(self, x: Tensor, a: Coef, s: Coef) -> Tensor:
        # the network sees x_t / sqrt(a^2 + s^2): unit variance for unit-variance data on any schedule (x_t on a VP one)
        return x * c((a * a + s * s) ** -0.5, x)

    @abstractmethod
    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        """The network's output at x_t as x_0 and eps."""

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        """What the network is trained to output at x_t = a x_0 + s eps."""

    @abstractmethod
    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        """The squared error of this target per unit of x_0's at the same x_t (what min-SNR weighting divides by)."""

    def sample_t(self, schedule: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        return self.time.sample(schedule, batch, device)

    def loss(self, net: Callable[..., Tensor], schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor,
             **net_kwargs: Any) -> Tensor:
        """Per-sample loss (B,) of the network at x_t = alpha_t x_0 + sigma_t noise, weighted."""
        a, s = schedule.coefs(t, x0)
        x_t = c(a, x0) * x0 + c(s, x0) * noise
        out = net(self.net_input(x_t, a, s), schedule.net_time(t).to(x0.device), **net_kwargs)
        mse = F.mse_loss(out.float(), self.target(x0, noise, a, s), reduction="none").flatten(1).mean(1)
        return mse * self.weighting(self, a.flatten(), s.flatten())

    def denoiser(self, output: Output) -> Denoiser:
        """denoise(x_t, level) -> Denoised, from ``output``: the network (guided, conditioning bound) at its input."""

        def denoise(x: Tensor, level: Level) -> Denoised:
            a, s = level.alpha, level.sigma
            return self.denoised(x, output(self.net_input(x, a, s), level).float(), a, s)

        return denoise

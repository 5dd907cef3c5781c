"""What every objective offers the LightningModule (noise levels, the loss) and the model (its output as eps)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.diffusion import Denoiser, sample_timesteps
from difflab.schedules import NoiseSchedule, signal_noise_at


class Objective(ABC):
    # the guidance scale trained into the network (a consistency model's), None for a plain diffusion model
    distilled_guidance: float | None = None

    def sample_t(self, s: NoiseSchedule, batch: int, device: torch.device | str) -> Tensor:
        # t ~ Uniform{0, ..., T-1}
        return sample_timesteps(batch, s.timesteps, torch.device(device))

    @abstractmethod
    def loss(self, net: Callable[..., Tensor], s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs: Any) -> Tensor:
        """Per-sample loss (B,) of the network at x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""

    @abstractmethod
    def eps_denoiser(self, output: Denoiser, s: NoiseSchedule) -> Denoiser:
        """``output(x, t)``: the network's output at its own input; returned: eps_theta(x_t, t) (t may be fractional:
        the Heun sampler evaluates between the trained steps)."""


def coefs(s: NoiseSchedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(ab_t), sqrt(1 - ab_t)) at integer or fractional t, shaped to broadcast over x, in x's dtype."""
    shape = (-1, *([1] * (x.ndim - 1)))
    a, sig = (c.reshape(shape).to(x.device, x.dtype) for c in signal_noise_at(s, t))
    return a, sig

"""How the loss weights the noise levels: uniform, or min-SNR-gamma (Hang et al. 2023), the x_0-space weight
min(SNR_t, gamma) expressed in the units of the prediction's own MSE."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule, signal_noise_at
from difflab.validate import number


class Target(Protocol):
    def x0_units(self, snr: Tensor) -> Tensor:
        """The MSE of this target per unit of x_0 MSE (a Prediction's)."""


class Weighting(ABC):
    @abstractmethod
    def __call__(self, prediction: Target, s: NoiseSchedule, t: Tensor) -> Tensor:
        """(B,) loss weights of the per-sample MSE of ``prediction``."""


class Uniform(Weighting):
    """Every noise level alike: the plain MSE of whatever the network predicts (DDPM's L_simple for eps)."""

    def __call__(self, prediction: Target, s: NoiseSchedule, t: Tensor) -> Tensor:
        return torch.ones(t.shape[0], device=t.device)

    def __repr__(self) -> str:
        return "Uniform()"


class MinSNR(Weighting):
    """min(SNR_t, gamma) on the x_0 MSE: min(SNR, gamma) / SNR on an eps loss, / (SNR + 1) on a v loss, as is on x_0."""

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = number("objective.weighting.gamma", gamma, 1e-6, hint=" (Hang et al.: 5)")

    def __call__(self, prediction: Target, s: NoiseSchedule, t: Tensor) -> Tensor:
        a, sig = signal_noise_at(s, t)
        snr = (a / sig) ** 2
        return (snr.clamp(max=self.gamma) / prediction.x0_units(snr)).float()  # min(SNR, gamma) / (MSE per x_0 MSE)

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma:g})"

"""How the loss weights the noise levels: uniform, or min-SNR-gamma (Hang et al. 2023), the x_0-space weight
min(SNR_t, gamma) expressed in the units of the objective's own target (SNR = alpha^2 / sigma^2)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor

from difflab.validate import number


class Target(Protocol):
    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        """The squared error of this target per unit of x_0's (an Objective's)."""


class Weighting(ABC):
    @abstractmethod
    def __call__(self, objective: Target, a: Tensor, s: Tensor) -> Tensor:
        """(B,) loss weights of the per-sample MSE, from alpha_t and sigma_t (B,) float64."""


class Uniform(Weighting):
    """Every noise level alike: the plain MSE of whatever the network predicts (DDPM's L_simple for eps)."""

    def __call__(self, objective: Target, a: Tensor, s: Tensor) -> Tensor:
        return torch.ones(a.shape[0], device=a.device)

    def __repr__(self) -> str:
        return "Uniform()"


class MinSNR(Weighting):
    """min(SNR_t, gamma) on the x_0 MSE: min(SNR, gamma) / SNR on an eps loss, / (SNR + 1) on a v loss, as is on x_0."""

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = number("objective.weighting.gamma", gamma, 1e-6, hint=" (Hang et al.: 5)")

    def __call__(self, objective: Target, a: Tensor, s: Tensor) -> Tensor:
        snr = (a / s) ** 2
        return (snr.clamp(max=self.gamma) / objective.x0_units(a, s)).float()  # min(SNR, gamma) / (MSE per x_0 MSE)

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma:g})"

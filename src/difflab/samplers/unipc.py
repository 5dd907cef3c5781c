"""UniPC (Zhao et al. 2023): a multistep predictor-corrector for the diffusion ODE in the data prediction, with the B(h)
coefficients of diffusers' UniPCMultistepScheduler (bh1: B(h) = -h, bh2: B(h) = e^-h - 1, in its signs).

With lambda = log(alpha / sigma), a step from s to t of length h = lambda_t - lambda_s, the data predictions m_i of
earlier steps and D_k = (m_k - m_s) / r_k, r_k = (lambda_k - lambda_s) / h:
  UniP (predictor):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m_s - alpha_t B(h) sum_k rho_k D_k
  UniC (corrector):  x_t redone from x_s once m_t is known, the sum extended by rho_last (m_t - m_s)
rho solves R rho = b with R_ik = r_k^(i-1), b_i = i! phi_(i+1)(-h) / B(h) (order 2 predictor and order 1 corrector:
rho = 1/2). The corrector reuses the network evaluation at x_t that the next step makes anyway: p steps, p evaluations.
A level of pure noise (lambda = -inf) starts the history after it: it has no finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.samplers.base import Noise, Sampler
from difflab.samplers.grids import check_settings, solver_spaced
from difflab.schedules import NoiseSchedule
from difflab.validate import choice, integer

VARIANTS = ("bh1", "bh2")


class UniPCSampler(Sampler):
    """steps (<= T-1 with linspace spacing), order p of the predictor (the corrector's accuracy is p + 1)."""

    name = "unipc"

    def __init__(self, steps: int = 10, order: int = 2, variant: str = "bh2", spacing: str = "linspace", clip_x0: bool = True) -> None:
        check_settings(steps, spacing)
        integer("sampler.order", order, 1, " (UniPC: 2 by default; 3 for more steps)")
        choice("sampler.variant", variant, VARIANTS, " (bh1 for unguided sampling in under 10 steps)")
        self.steps, self.order, self.variant, self.spacing, self.clip_x0 = steps, order, variant, spacing, clip_x0
        self.reset()

    def times(self, schedule: NoiseSchedule) -> list[float]:
        return solver_spaced(schedule, self.steps, self.spacing)

    def reset(self) -> None:
        self._history: list[tuple[Tensor, float]] = []  # (m, lambda) of the steps so far, the newest last
        self._last: tuple[Tensor, Level, int] | None = None  # (x_s, s, the predictor's order) of the previous step
        self._times: list[float] | None = None

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        m = self.read(x, denoise, cur).x0
        if self._last is not None and math.isfinite(self._last[1].lam):  # UniC: x_t again from x_s, now that m_t is known
            x_s, s_level, order = self._last
            x = self.update(x_s, s_level, cur, order, m)
        self._history = [*(e for e in self._history if math.isfinite(e[1])), (m, cur.lam)][-self.order :]
        self._times = self._times or self.times(schedule)
        # warm-up from order 1; lower orders at the end (the last step, to the clean image, is first order)
        order = min(self.order, len(self._history), len(self._times) - self._times.index(cur.t))
        self._last = (x, cur, order)
        return self.update(x, cur, nxt, order), m

    def update(self, x: Tensor, s_level: Level, t_level: Level, order: int, m_t: Tensor | None = None) -> Tensor:
        """UniP from x at s to t (m_t None), or UniC with m_t; the history's newest entry is m_s, at s."""
        m_s, lam_s = self._history[-1]
        earlier = self._history[:-1]
        h = t_level.lam - lam_s
        r = [(lam_k - lam_s) / h for _, lam_k in earlier[::-1][: order - 1]]
        d = [(m_k - m_s) / r_k for (m_k, _), r_k in zip(earlier[::-1], r)]  # D_k
        hh = -h
        h_phi_1 = math.expm1(hh)  # h phi_1 = e^-h - 1
        b_h = hh if self.variant == "bh1" else h_phi_1  # B(h)
        # b_i = i! phi_(i+1)(hh) / B(h), from h phi_k's recursion phi_(k+1) = (phi_k - 1/k!) / hh
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rows = np.array([[r_k ** (i - 1) for r_k in [*r, 1.0]] for i in range(1, order + 1)])
        # x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_s: the first-order (DDIM) part
        x_t = (t_level.sigma / s_level.sigma) * x - (t_level.alpha * h_phi_1) * m_s
        if m_t is None:  # UniP
            if d:
                rho = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
                x_t = x_t - (t_level.alpha * b_h) * sum(float(rho_k) * d_k for rho_k, d_k in zip(rho, d))
            return x_t
        rho = [0.5] if order == 1 else np.linalg.solve(rows, b)  # UniC
        correction = sum((float(rho_k) * d_k for rho_k, d_k in zip(rho[:-1], d)), torch.zeros_like(x)) + float(rho[-1]) * (m_t - m_s)
        return x_t - (t_level.alpha * b_h) * correction

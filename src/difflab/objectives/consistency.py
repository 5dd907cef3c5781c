"""A consistency model (Song et al. 2023) tuned from a trained diffusion model, classifier-free guidance distilled in.

f_theta(x_t, t) maps every point of a probability-flow ODE trajectory to its clean end, so one network call makes a
sample. It is parametrised by the objective of the model it is tuned from (any: for v, f = alpha x_t - sigma v_theta),
so tuning starts from that model's weights, where f is its one-step x_0 prediction, and f(x_t, t) -> x_t as t -> 0.

Tuning (easy consistency tuning, Geng et al. 2024, here as consistency distillation so the guidance is distilled in):
with x_t = alpha_t x_0 + sigma_t eps, one DDIM step of the frozen teacher, guided with scale w, goes from t to r < t
along the guided ODE, and the loss is the pseudo-Huber distance (Song & Dhariwal 2023) d(f_theta(x_t, t), sg
f_theta(x_r, r)), with f(x_r, 0) = x_r, the clean image. The gap shrinks in stages (ECT's curriculum): stage
k = step // stage_steps pairs t with r = t - t / 2^k (on a T-step grid rounded up to whole steps: r = t -
ceil((i + 1) / 2^k) steps from step i), so stage 0 (r = 0) distils the guided teacher's x_0 prediction and later stages
tie ever closer points of each trajectory together.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.diffusion import Denoised
from difflab.errors import ConfigError
from difflab.guidance import guided_output
from difflab.objectives.base import Coef, Objective, c
from difflab.schedules import NoiseSchedule
from difflab.validate import integer, number


class Consistency(Objective):
    """``prediction``: the parametrisation of f (the tuned model's own objective: any Objective, e.g. VPrediction);
    ``guidance``: the scale w distilled in (the samples follow the teacher guided with w, in one network call per step)."""

    def __init__(self, prediction: Objective, guidance: float = 2.0, stage_steps: int = 100, max_stage: int = 6,
                 huber_c: float = 0.00054, target_ema: float = 0.0) -> None:
        if not isinstance(prediction, Objective) or isinstance(prediction, Consistency):
            raise ConfigError(f"objective.prediction: the objective of the model it is tuned from (eps, x0, v, edm or flow), "
                              f"not {type(prediction).__name__}")
        super().__init__()
        self.prediction = prediction
        self.distilled_guidance = number("objective.guidance", guidance, 0, hint=" (the teacher's guidance scale, e.g. 2)")
        self.stage_steps = integer("objective.stage_steps", stage_steps, 1, " (training steps per halving of the gap t - r)")
        self.max_stage = integer("objective.max_stage", max_stage, 0, " (the last halving: gap t / 2^max_stage)")
        self.huber_c = number("objective.huber_c", huber_c, 0, hint=" (Song & Dhariwal: 0.00054 sqrt(d))")
        if not 0 <= target_ema < 1:
            raise ConfigError(f"objective.target_ema={target_ema}: must be in [0, 1) (0: the network itself makes the targets)")
        self.target_ema = float(target_ema)

    def __repr__(self) -> str:
        return (f"Consistency({type(self.prediction).__name__}, guidance={self.distilled_guidance:g}, "
                f"stage_steps={self.stage_steps}, max_stage={self.max_stage}, target_ema={self.target_ema:g})")

    # f is read as the teacher's objective reads its network
    def check(self, schedule: NoiseSchedule) -> None:
        self.prediction.check(schedule)

    def net_input(self, x: Tensor, a: Coef, s: Coef) -> Tensor:
        return self.prediction.net_input(x, a, s)

    def denoised(self, x: Tensor, out: Tensor, a: Coef, s: Coef) -> Denoised:
        return self.prediction.denoised(x, out, a, s)

    def target(self, x0: Tensor, eps: Tensor, a: Coef, s: Coef) -> Tensor:
        return self.prediction.target(x0, eps, a, s)

    def x0_units(self, a: Tensor, s: Tensor) -> Tensor:
        return self.prediction.x0_units(a, s)

    def f(self, net: Callable[..., Tensor], schedule: NoiseSchedule, x_t: Tensor, t: Tensor, **net_kwargs: Any) -> Tensor:
        # f_theta(x_t, t) = the network's output as x_0
        a, s = schedule.coefs(t, x_t)
        out = net(self.net_input(x_t, a, s), schedule.net_time(t).to(x_t.device), **net_kwargs)
        return self.denoised(x_t, out.float(), a, s).x0

    def partner(self, t: Tensor, step: int, schedule: NoiseSchedule) -> Tensor:
        """r < t for each t at this training step; 0 is the clean image."""
        k = min(step // self.stage_steps, self.max_stage)
        T = schedule.timesteps
        if T is None:
            return t * (1 - 0.5**k)  # r = t - t / 2^k
        i = (t * T - 1).round().long()
        # r = t - ceil((i + 1) / 2^k) steps
        return (i - torch.div(i + 2**k, 2**k, rounding_mode="floor") + 1).double() / T

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        # d(a, b) = sqrt(|a - b|^2 + c^2) - c, with c = huber_c sqrt(dim), per sample
        c_ = self.huber_c * a[0].numel() ** 0.5
        return ((a - b).flatten(1).pow(2).sum(1) + c_**2).sqrt() - c_

    def teacher_step(self, teacher: nn.Module, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, r: Tensor,
                     context: Tensor | None) -> Tensor:
        """x_r from x_t by one DDIM step of the teacher guided with w (x_0 clipped to the data range, as the samplers do)."""
        a, s = schedule.coefs(t, x_t)
        out = guided_output(teacher, context, self.distilled_guidance)(self.net_input(x_t, a, s), schedule.net_time(t).to(x_t.device))
        x0 = self.denoised(x_t, out, a, s).x0.clamp(-1, 1)
        eps = (x_t - c(a, x_t) * x0) / c(s, x_t)
        a_r, s_r = schedule.coefs(r, x_t)
        # x_r = alpha_r x_0 + sigma_r eps (r = 0: x_0)
        return c(a_r, x_t) * x0 + c(s_r, x_t) * eps

    def pair_loss(self, net: Callable[..., Tensor], teacher: nn.Module, schedule: NoiseSchedule, x0: Tensor, t: Tensor,
                  noise: Tensor, step: int, context: Tensor | None = None, target_net: Callable[..., Tensor] | None = None) -> Tensor:
        """Per-sample consistency loss (B,) at training step ``step`` (which sets the gap t - r); the target f(x_r, r)
        comes from ``target_net`` (the slow average of net, target_ema > 0) or from net itself."""
        r = self.partner(t, step, schedule)
        x_t = schedule.add_noise(x0, t, noise)
        kwargs = {"context": context} if context is not None else {}
        with torch.no_grad():
            x_r = self.teacher_step(teacher, schedule, x_t, t, r, context)
            clean = (r <= 0).reshape(-1, *[1] * (x0.ndim - 1)).to(x0.device)
            target = torch.where(clean, x_r, self.f(target_net or net, schedule, x_r, r.clamp(min=schedule.t_min), **kwargs))
        return self.distance(self.f(net, schedule, x_t, t, **kwargs), target)

    def loss(self, net: Callable[..., Tensor], schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor,
             **net_kwargs: Any) -> Tensor:
        """The one-step error d(f(x_t, t), x_0): what validation logs as val/loss (training uses pair_loss)."""
        return self.distance(self.f(net, schedule, schedule.add_noise(x0, t, noise), t, **net_kwargs), x0)

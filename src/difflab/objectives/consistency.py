"""A consistency model (Song et al. 2023) tuned from a trained diffusion model, classifier-free guidance distilled in.

f_theta(x_t, t) maps every point of a probability-flow ODE trajectory to its clean end, so one network call makes a
sample. It is parametrised by the prediction of the model it is tuned from (for v: f = a x_t - s v_theta), so tuning
starts from that model's weights, where f is its one-step x_0 prediction, and f(x_t, t) -> x_t as t -> the clean image.

Tuning (easy consistency tuning, Geng et al. 2024, here as consistency distillation so the guidance is distilled in):
with x_t = a_t x_0 + s_t eps, one DDIM step of the frozen teacher, guided with scale w, goes from t to r < t along the
guided ODE, and the loss is the pseudo-Huber distance (Song & Dhariwal 2023) d(f_theta(x_t, t), sg f_theta(x_r, r)),
with f(x_r, -1) = x_r, the clean image. The gap shrinks in stages (ECT's curriculum): stage k = step // stage_steps
pairs t with r = t - ceil((t + 1) / 2^k), so stage 0 (r = -1) distils the guided teacher's x_0 prediction and later
stages tie ever closer points of each trajectory together.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.diffusion import Denoiser, predict_eps_from_x0, q_sample
from difflab.errors import ConfigError
from difflab.guidance import guided_output
from difflab.objectives.base import Objective
from difflab.objectives.prediction import Prediction
from difflab.schedules import NoiseSchedule
from difflab.validate import integer, number


class Consistency(Objective):
    """``prediction``: the parametrisation of f (the tuned model's own objective, e.g. VPrediction); ``guidance``: the
    scale w distilled in (the samples follow the teacher guided with w, in one network call per step)."""

    def __init__(self, prediction: Prediction, guidance: float = 2.0, stage_steps: int = 100, max_stage: int = 6,
                 huber_c: float = 0.00054, target_ema: float = 0.0) -> None:
        if not isinstance(prediction, Prediction):
            raise TypeError(f"objective.prediction: a Prediction (eps, x0 or v), not {type(prediction).__name__}")
        self.prediction = prediction
        self.distilled_guidance = number("objective.guidance", guidance, 0, hint=" (the teacher's guidance scale, e.g. 2)")
        self.stage_steps = integer("objective.stage_steps", stage_steps, 1, " (training steps per halving of the gap t - r)")
        self.max_stage = integer("objective.max_stage", max_stage, 0, " (the last halving: gap (t + 1) / 2^max_stage)")
        self.huber_c = number("objective.huber_c", huber_c, 0, hint=" (Song & Dhariwal: 0.00054 sqrt(d))")
        if not 0 <= target_ema < 1:
            raise ConfigError(f"objective.target_ema={target_ema}: must be in [0, 1) (0: the network itself makes the targets)")
        self.target_ema = float(target_ema)

    def __repr__(self) -> str:
        return (f"Consistency({type(self.prediction).__name__}, guidance={self.distilled_guidance:g}, "
                f"stage_steps={self.stage_steps}, max_stage={self.max_stage}, target_ema={self.target_ema:g})")

    def f(self, net: Callable[..., Tensor], s: NoiseSchedule, x_t: Tensor, t: Tensor, **net_kwargs: Any) -> Tensor:
        # f_theta(x_t, t) = the network's output as x_0
        return self.prediction.to_x0(s, x_t, t, net(x_t, t, **net_kwargs).float())

    def partner(self, t: Tensor, step: int) -> Tensor:
        """r < t for each t at this training step; -1 is the clean image."""
        k = min(step // self.stage_steps, self.max_stage)
        # r = t - ceil((t + 1) / 2^k)
        return t - torch.div(t + 2**k, 2**k, rounding_mode="floor")

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        # d(a, b) = sqrt(|a - b|^2 + c^2) - c, with c = huber_c sqrt(dim), per sample
        c = self.huber_c * a[0].numel() ** 0.5
        return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c

    def teacher_step(self, teacher: nn.Module, s: NoiseSchedule, x_t: Tensor, t: Tensor, r: Tensor, context: Tensor | None) -> Tensor:
        """x_r from x_t by one DDIM step of the teacher guided with w (x_0 clipped to the data range, as the samplers do)."""
        out = guided_output(teacher, context, self.distilled_guidance)(x_t, t)  # out_c + w (out_c - out_u)
        x0 = self.prediction.to_x0(s, x_t, t, out).clamp(-1, 1)
        eps = predict_eps_from_x0(s, x_t, t, x0)
        ab_r = torch.where(r >= 0, s.alphas_cumprod[r.clamp(min=0)], torch.ones_like(s.alphas_cumprod[0])).to(x_t.dtype)
        ab_r = ab_r.reshape(-1, *[1] * (x_t.ndim - 1))
        # x_r = sqrt(ab_r) x_0 + sqrt(1 - ab_r) eps
        return ab_r.sqrt() * x0 + (1 - ab_r).sqrt() * eps

    def pair_loss(self, net: Callable[..., Tensor], teacher: nn.Module, s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor,
                  step: int, context: Tensor | None = None, target_net: Callable[..., Tensor] | None = None) -> Tensor:
        """Per-sample consistency loss (B,) at training step ``step`` (which sets the gap t - r); the target f(x_r, r)
        comes from ``target_net`` (the slow average of net, target_ema > 0) or from net itself."""
        r = self.partner(t, step)
        x_t = q_sample(s, x0, t, noise)
        kwargs = {"context": context} if context is not None else {}
        with torch.no_grad():
            x_r = self.teacher_step(teacher, s, x_t, t, r, context)
            clean = (r < 0).reshape(-1, *[1] * (x0.ndim - 1))
            target = torch.where(clean, x_r, self.f(target_net or net, s, x_r, r.clamp(min=0), **kwargs))
        return self.distance(self.f(net, s, x_t, t, **kwargs), target)

    def loss(self, net: Callable[..., Tensor], s: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs: Any) -> Tensor:
        """The one-step error d(f(x_t, t), x_0): what validation logs as val/loss (training uses pair_loss)."""
        return self.distance(self.f(net, s, q_sample(s, x0, t, noise), t, **net_kwargs), x0)

    def eps_denoiser(self, output: Denoiser, s: NoiseSchedule) -> Denoiser:
        return self.prediction.eps_denoiser(output, s)

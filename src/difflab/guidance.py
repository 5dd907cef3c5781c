"""Classifier-free guidance (Ho & Salimans 2022) on a conditional network's output.

out = out_c + w (out_c - out_u): w = 0 is the plain conditional model, diffusers' guidance_scale = 1 + w. out_u is the
network with its learned null context, the one context dropout (p_uncond) trains. The combination is affine, so on
eps, x_0, v or velocity outputs it is the same guidance; CFG rescale, which compares standard deviations, acts on the
network's own output (as diffusers' rescale_noise_cfg on a v model's). The objective reads the guided output
(Objective.denoiser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.diffusion import Level
from difflab.errors import ConfigError
from difflab.validate import number


@dataclass(frozen=True)
class Guidance:
    """Guidance scale w, applied only for noise levels sigma in ``interval`` = [sigma_lo, sigma_hi] when given
    (Kynkaanniemi et al. 2024; sigma_t = sqrt((1 - ab_t) / ab_t)), with CFG rescale ``rescale`` (Lin et al. 2024;
    0 = off, 0.7 in the paper). Checked at construction, under the keys sample.py and evaluate.py use."""

    scale: float = 0.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", number("guidance", self.scale, hint=" (0: plain conditional, e.g. guidance=2)"))
        object.__setattr__(self, "rescale", number("guidance_rescale", self.rescale, 0, 1, " (0: off; Lin et al. use 0.7)"))
        if self.interval is not None:
            object.__setattr__(self, "interval", _interval(self.interval))

    def active(self, level: Level) -> bool:
        """Whether this level is guided: EDM's noise level sigma / alpha inside the interval (or no interval)."""
        return self.interval is None or self.interval[0] <= level.edm_sigma <= self.interval[1]

    def output(self, net: nn.Module, context: Tensor | None, cond: Tensor | None = None) -> Callable[[Tensor, Level], Tensor]:
        """output(network input, level): the network's guided output there, context (and a network's image conditioning
        ``cond``) bound; its time input the level's."""
        guided = guided_output(net, context, self.scale, self.rescale, cond)

        def output(x: Tensor, level: Level) -> Tensor:
            return guided(x, torch.full((x.shape[0],), level.net_t, device=x.device), self.active(level))

        return output


def _interval(value: Any) -> tuple[float, float]:
    lo_hi = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []
    if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lo_hi) \
            or not 0 <= lo_hi[0] < lo_hi[1]:
        raise ConfigError(f"guidance_interval={value!r}: give [sigma_lo, sigma_hi] with 0 <= lo < hi "
                          "(e.g. guidance_interval=[0.3,5]), or null to guide at every step")
    return float(lo_hi[0]), float(lo_hi[1])


def guided_output(net: nn.Module, context: Tensor | None = None, guidance: float = 0.0, rescale: float = 0.0,
                  cond: Tensor | None = None) -> Callable[..., Tensor]:
    """output(x, t, guide=True): context (B, K) or None (unconditional). Both branches share one batched forward when
    w != 0 and ``guide``; else the plain conditional output (one forward). ``cond`` (B, C', H, W): the images a network
    with cond_channels takes beside x_t, the same in both branches.

    rescale phi: CFG rescale (Lin et al. 2024, eq. 15-16, as diffusers' rescale_noise_cfg),
    out <- phi out_cfg std(out_c) / std(out_cfg) + (1 - phi) out_cfg.

    Inputs are cast to the network's own dtype (a bf16 copy of the weights samples faster on CPU than
    autocast, which re-casts every weight at every step); the sampler's update math stays in float32.
    """
    dtype = next(net.parameters()).dtype

    def call(x: Tensor, t: Tensor, ctx: Tensor | None, keep: Tensor | None, c: Tensor | None) -> Tensor:
        ctx = ctx.to(dtype) if ctx is not None else None
        images = {} if c is None else {"cond": c.to(dtype)}  # only networks built with cond_channels take it
        with torch.autocast(x.device.type, enabled=False):  # the weights' dtype decides, also inside a bf16-mixed trainer
            return net(x.to(dtype), t, ctx, keep, **images).float()

    def output(x: Tensor, t: Tensor, guide: bool = True) -> Tensor:
        if context is None:
            return call(x, t, None, None, cond)
        if guidance == 0 or not guide:
            return call(x, t, context, None, cond)
        b = x.shape[0]
        keep = torch.cat([torch.ones(b, dtype=torch.bool, device=x.device), torch.zeros(b, dtype=torch.bool, device=x.device)])
        both = torch.cat([cond, cond]) if cond is not None else None
        out_c, out_u = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, context]), keep, both).chunk(2)
        out = out_c + guidance * (out_c - out_u)
        if rescale:
            dims = list(range(1, out.ndim))
            out = rescale * out * (out_c.std(dims, keepdim=True) / out.std(dims, keepdim=True)) + (1 - rescale) * out
        return out

    return output

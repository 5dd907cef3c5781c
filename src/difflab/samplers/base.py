"""What every sampler shares: the output, and the one loop that walks a grid of noise levels.

A sampler is a step rule: ``levels(schedule)``, its decreasing grid (the last the clean image, t = 0), and
``step(x, denoise, schedule, cur, nxt, noise)``, one move from level ``cur`` to the less noisy ``nxt``; it knows nothing
of models or Lightning: ``denoise(x, level)`` returns the model's Denoised (x_0 and eps; model.py). ``walk`` is the only
sampling loop: plain sampling, inpainting (a ``keep`` after every step, RePaint's jumps back up the grid), variations
(a later start) and the ONNX export all run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difflab.diffusion import Denoised, Denoiser, Level
from difflab.schedules import NoiseSchedule

# where step noise comes from: one torch.Generator for the batch, or per-image streams (anything with randn_like)
Noise = Any


@dataclass
class SampleOutput:
    images: Tensor  # (N, C, H, W), float in [-1, 1] (unclamped model output)
    chain: list[Tensor] = field(default_factory=list)  # recorded x_t, first = the start, last = images
    x0_chain: list[Tensor] = field(default_factory=list)  # the x_0 predicted at each recorded step: chain[1:]'s
    chain_t: list[float] = field(default_factory=list)  # the t of each chain frame (0.0 = the clean image)
    pixels: Tensor | None = None  # (N, C, H, W) uint8 after the output stage (difflab.sampling.generate)


class Sampler:
    """Subclasses define ``levels`` and ``step``; ``name``: its conf/sampler/ file. ``clip_x0``: x_0 clipped to the data
    range before it is used (and eps made consistent with it)."""

    name: str = ""
    clip_x0: bool = True

    def settings(self) -> dict[str, Any]:
        """The constructor's settings as set (what a record of the sampling names)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def levels(self, schedule: NoiseSchedule) -> list[Level]:
        """The grid: decreasing noise levels, the last the clean image."""
        return [*(schedule.level(t) for t in self.times(schedule)), schedule.level(0.0)]

    def times(self, schedule: NoiseSchedule) -> list[float]:
        """The t of every step's start (decreasing)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Clear state carried between steps (multistep solvers)."""

    def step(self, x: Tensor, denoise: Denoiser, schedule: NoiseSchedule, cur: Level, nxt: Level,
             noise: Noise | None) -> tuple[Tensor, Tensor]:
        """One move x at ``cur`` -> x at ``nxt``; returns (x_next, the x_0 it predicted)."""
        raise NotImplementedError

    def read(self, x: Tensor, denoise: Denoiser, level: Level) -> Denoised:
        """The model at (x, level), x_0 clipped where asked."""
        den = denoise(x, level)
        return den.clipped(x, level) if self.clip_x0 else den

    def sample(self, denoise: Denoiser, schedule: NoiseSchedule, x: Tensor, noise: Noise | None = None, record_every: int = 0,
               progress: bool = False) -> SampleOutput:
        """The whole grid from x at its first level."""
        return walk(self, denoise, schedule, self.levels(schedule), x, noise, record_every=record_every, progress=progress)


@torch.no_grad()
def walk(sampler: Sampler, denoise: Denoiser, schedule: NoiseSchedule, levels: Sequence[Level], x: Tensor,
         noise: Noise | None = None, path: Sequence[int] | None = None, keep: Callable[[Tensor, Level], Tensor] | None = None,
         record_every: int = 0, progress: bool = False) -> SampleOutput:
    """x at levels[path[0]] walked along ``path`` (positions in ``levels``; default: all of them in order). Down one
    position is one sampler step, then ``keep(x, level)`` (inpainting puts the known pixels back); up is forward noising
    (RePaint's jump back), after which a multistep solver starts afresh. Every ``record_every`` moves (and the last) the
    chain records x and the predicted x_0."""
    path = list(range(len(levels))) if path is None else list(path)
    sampler.reset()
    out = SampleOutput(images=x)
    if record_every:
        out.chain.append(x.cpu()), out.chain_t.append(levels[path[0]].t)
    x0 = x
    moves = list(zip(path, path[1:]))
    for i, (p, q) in enumerate(_progress(moves, progress, type(sampler).__name__)):
        cur, nxt = levels[p], levels[q]
        if q == p + 1:
            x, x0 = sampler.step(x, denoise, schedule, cur, nxt, noise)
            x = keep(x, nxt) if keep is not None else x
        else:
            x = renoise(x, cur, nxt, noise)
            sampler.reset()  # a multistep solver's history belongs to the trajectory it left
        if record_every and ((i + 1) % record_every == 0 or i == len(moves) - 1):
            out.chain.append(x.cpu()), out.x0_chain.append(x0.cpu()), out.chain_t.append(nxt.t)
    out.images = x
    return out


def renoise(x: Tensor, cur: Level, up: Level, noise: Noise | None, scale: float = 1.0) -> Tensor:
    # x_up ~ q(x_up | x_cur) = N((alpha_up / alpha_cur) x_cur, (sigma_up^2 - (alpha_up / alpha_cur)^2 sigma_cur^2) I)
    ratio = up.alpha / cur.alpha
    return ratio * x + scale * math.sqrt(max(up.sigma**2 - ratio**2 * cur.sigma**2, 0.0)) * noise_like(x, noise)


def noised(x0: Tensor, level: Level, z: Tensor) -> Tensor:
    # x_t = alpha x_0 + sigma z (the clean level: x_0 itself)
    return x0 if level.clean else level.alpha * x0 + level.sigma * z


def _progress(steps: list, enabled: bool, name: str):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=name, leave=False)


def noise_like(x: Tensor, generator: Noise | None) -> Tensor:
    if hasattr(generator, "randn_like"):  # per-image streams (difflab.sampling.ImageNoise)
        return generator.randn_like(x)
    # drawn on the generator's device, so a CPU generator gives the same numbers on any accelerator
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

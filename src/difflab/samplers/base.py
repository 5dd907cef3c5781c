"""What every sampler shares: timestep spacing, the sampling loop with chain recording, the output.

Samplers take a denoiser eps_theta(x_t, t) (conditioning already bound, see guidance.py) and a
NoiseSchedule; they know nothing of Lightning. Timesteps are 0-based; t_prev = -1 means "the clean
image", where alpha_bar = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.diffusion import Denoiser, predict_x0_from_eps
from difflab.errors import ConfigError
from difflab.schedules import NoiseSchedule
from difflab.validate import integer, number

SPACINGS = ("leading", "trailing", "linspace")
# where step noise comes from: one torch.Generator for the batch, or per-image streams (anything with randn_like)
Noise = Any


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Decreasing timesteps for a ``steps``-step sampler over a T-step schedule (diffusers' conventions).

    trailing: round(T - k T/steps) - 1, starts at T-1 (Lin et al. 2023, "Common diffusion noise
    schedules and sample steps are flawed"); leading: k (T // steps); linspace: linspace(0, T-1).
    """
    check_steps(T, steps)
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round().astype(np.int64)[::-1]
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return [int(t) for t in ts]


def solver_timesteps(T: int, steps: int, spacing: str) -> list[int]:
    """The timesteps of a multistep ODE solver that ends at the clean image (diffusers' DPM-Solver and UniPC): with
    linspace, steps + 1 points from T-1 down to 0, the final 0 replaced by the clean image (so at most T-1 steps, checked
    as typed); trailing and leading as spaced_timesteps."""
    if spacing == "linspace":
        check_steps(T, steps, reserved=1)
        return sorted(set(spaced_timesteps(T, steps + 1, "linspace")[:-1]), reverse=True)
    return spaced_timesteps(T, steps, spacing)


def check_steps(T: int, steps: int, reserved: int = 0) -> None:
    """1 <= steps <= T - reserved: a sampler that spends ``reserved`` of the T timesteps elsewhere allows fewer."""
    most = T - reserved
    if not 1 <= steps <= most:
        raise ConfigError(f"steps must be in [1, T{f'-{reserved}' if reserved else ''}={most}], got {steps}")


def check_settings(steps: int | None = None, spacing: str | None = None, eta: float | None = None) -> None:
    """Sampler settings as typed on the command line (steps <= T is checked once T is known)."""
    if steps is not None:
        integer("sampler.steps", steps, 1, " (or steps=N on the command line)")
    if spacing is not None and spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r}: choose one of {SPACINGS}")
    if eta is not None:
        number("sampler.eta", eta, 0, 1, " (0: deterministic DDIM, 1: DDPM-like noise)")


def at(t: int, x: Tensor) -> Tensor:
    """The integer timestep t for every row of x, for difflab.diffusion's per-row formulas."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def alpha_bar(s: NoiseSchedule, t: int) -> Tensor:
    """alpha_bar_t as a 0-d tensor, with alpha_bar_{-1} = 1."""
    return s.alphas_cumprod[t] if t >= 0 else torch.ones((), device=s.alphas_cumprod.device)


@dataclass
class SampleOutput:
    images: Tensor  # (N, C, H, W), float in [-1, 1] (unclamped model output)
    chain: list[Tensor] = field(default_factory=list)  # recorded x_t, first = x_T, last = images
    x0_chain: list[Tensor] = field(default_factory=list)  # the x_0 predicted at each recorded step: chain[1:]'s
    chain_t: list[int] = field(default_factory=list)  # the t of each chain frame (-1 = final)
    pixels: Tensor | None = None  # (N, C, H, W) uint8 after the output stage (difflab.sampling.generate)


class Sampler:
    """Subclasses define ``timesteps(T)`` and ``step(...)``; ``sample`` runs the loop. ``name``: its conf/sampler/ file."""

    name: str = ""
    clip_x0: bool = True

    def settings(self) -> dict[str, Any]:
        """The constructor's settings as set (what a record of the sampling names)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def timesteps(self, T: int) -> list[int]:
        raise NotImplementedError

    def reset(self) -> None:
        """Clear state carried between steps (multistep solvers)."""

    def step(self, s: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, generator: Noise | None) -> tuple[Tensor, Tensor]:
        """One update x_t -> x_{t_prev}; returns (x_prev, predicted x_0)."""
        raise NotImplementedError

    def predict_x0(self, s: NoiseSchedule, x_t: Tensor, t: int, eps: Tensor) -> Tensor:
        # x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), clipped to the data range where asked
        x0 = predict_x0_from_eps(s, x_t, at(t, x_t), eps)
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        s: NoiseSchedule,
        x_T: Tensor,
        generator: Noise | None = None,
        record_every: int = 0,
        progress: bool = False,
    ) -> SampleOutput:
        ts = self.timesteps(s.timesteps)
        self.reset()
        out = SampleOutput(images=x_T)
        x = x_T
        if record_every:
            out.chain.append(x.cpu()), out.chain_t.append(ts[0])
        steps = list(zip(ts, ts[1:] + [-1]))
        for i, (t, t_prev) in enumerate(_progress(steps, progress, type(self).__name__)):
            eps = denoise(x, at(t, x)).float()
            x, x0 = self.step(s, eps, t, t_prev, x, generator)
            if record_every and ((i + 1) % record_every == 0 or t_prev == -1):
                out.chain.append(x.cpu()), out.x0_chain.append(x0.cpu()), out.chain_t.append(t_prev)
        out.images = x
        return out


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

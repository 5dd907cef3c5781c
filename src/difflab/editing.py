"""Edits of existing images with any sampler: inpainting (RePaint, or plain replacement), variations and class
transfer (SDEdit) and interpolation (spherical, of the noise and of every step's noise).

Each edit is handed to ``difflab.sampling.generate(plan, ..., edit=...)``, which lets it start and walk each chunk with
everything else of a sampling plan unchanged: the model's denoiser and guidance, the precision, batching, the per-image
noise streams of (seed, i) and the output stage. Every edit runs the samplers' one loop (samplers.base.walk) on the
plan's grid of noise levels [l_0 > l_1 > ... > l_S = the clean image], by position p in 0..S: down (p -> p+1) is one
sampler step, up (p -> p-1) is forward noising (RePaint's jump back). Sources are uint8 (N, C, H, W) as the data sets
hold them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.diffusion import Denoiser, Level
from difflab.errors import ConfigError
from difflab.images import to_unit_range
from difflab.masks import known_pixels
from difflab.samplers.base import Noise, SampleOutput, noise_like, noised, walk
from difflab.validate import integer, number

# a difflab.sampling.SamplingPlan (its sampler, levels, model and init_scale); the plan imports the edits, not the reverse
SamplingPlan = Any

INPAINT_METHODS = ("auto", "repaint", "replace")


def repaint_path(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Positions 0..steps in the order RePaint visits them (Lugmayr et al. 2022, its get_schedule_jump): down one step at
    a time and, every ``jump_length`` steps while that many remain, back up ``jump_length`` steps, ``jump_n_sample`` - 1
    times; jump_n_sample = 1 is the plain walk 0, 1, ..., steps."""
    # counted down as RePaint does: c = steps - 1 - p, jumps where c = 0, L, 2L, ... < steps - L
    jumps = {c: jump_n_sample - 1 for c in range(0, steps - jump_length, jump_length)}
    c, path = steps - 1, [0]
    while c >= 0:
        c -= 1
        path.append(steps - 1 - c)
        if jumps.get(c, 0) > 0:
            jumps[c] -= 1
            for _ in range(jump_length):
                c += 1
                path.append(steps - 1 - c)
    return path


class Edit:
    """What ``generate`` asks of an edit. ``rows``: the slice of the batch being sampled (sources and masks per row)."""

    def noise(self, streams: Callable[[int, Sequence[int]], Noise], seed: int, index: Sequence[int]) -> Noise:
        """The noise of images ``index``; ``streams(seed, index)``: the request's per-image streams."""
        return streams(seed, index)

    def sample(self, plan: SamplingPlan, denoise: Denoiser, z: Tensor, noise: Noise, rows: slice, record_every: int = 0,
               progress: bool = False) -> SampleOutput:
        """The chunk ``rows``, from its first draw z (standard normal), along the plan's levels."""
        raise NotImplementedError

    def finish(self, pixels: Tensor) -> Tensor:
        """The uint8 results after the output stage (all rows)."""
        return pixels

    def for_model(self, inpainting: bool, steps: int) -> Edit:
        """This edit with its settings resolved for a model that does (or does not) take known pixels beside x_t, sampled
        in ``steps`` sampler steps."""
        return self

    def known(self, rows: slice, device: torch.device) -> Tensor | None:
        """What an inpainting model sees beside x_t for ``rows`` (difflab.masks.known_pixels); None: nothing known."""
        return None

    def record(self) -> dict:
        """The edit's settings (JSON), for meta.json."""
        return {}


class Inpaint(Edit):
    """Fill the pixels where ``fill`` (N, 1, H, W) is true, keep the others of ``source`` (N, C, H, W uint8) exactly.

    method="replace": after every sampler step the kept pixels are replaced by the source noised to the new level
    (fresh noise each time). method="repaint" (Lugmayr et al. 2022): the same, and every ``jump_length`` steps the image is
    noised back ``jump_length`` steps and denoised again, ``jump_n_sample`` - 1 times, so the filled region settles with
    what is kept: about jump_n_sample times the network calls of "replace". A model tuned for inpainting also sees the
    known pixels and the mask at every step (difflab.masks.known_pixels); method="auto": replace for such a model, which
    needs no resampling or on a sampler with too few steps to jump back (no more than jump_length), repaint for any other.
    """

    def __init__(self, source: Tensor, fill: Tensor, method: str = "auto", jump_length: int = 3, jump_n_sample: int = 4) -> None:
        if method not in INPAINT_METHODS:
            raise ConfigError(f"method={method!r}: choose auto (replace for an inpainting model, else repaint), repaint "
                              "(better, slower) or replace (one pass)")
        self.method = method
        self.jump_length = integer("jump_length", jump_length, 1, " (steps to jump back; RePaint: 10 of 250)")
        self.jump_n_sample = integer("jump_n_sample", jump_n_sample, 1, " (passes over each jump; 1: no resampling)")
        if source.dtype != torch.uint8 or source.ndim != 4 or fill.shape != (source.shape[0], 1, *source.shape[2:]):
            raise ValueError(f"Inpaint: source uint8 (N, C, H, W) and fill (N, 1, H, W), got {tuple(source.shape)} "
                             f"{source.dtype} and {tuple(fill.shape)}")
        self.source, self.fill = source, fill.bool()

    def for_model(self, inpainting: bool, steps: int) -> Inpaint:
        jumps = steps > self.jump_length  # RePaint jumps back jump_length steps, so only with more steps than that
        if self.method == "repaint" and not jumps and self.jump_n_sample > 1:
            raise ConfigError(f"edit.method=repaint jumps back edit.jump_length={self.jump_length} steps, but the sampler takes "
                              f"{steps}: give it more steps (steps={self.jump_length + 1} or more), a smaller edit.jump_length, "
                              "or edit.method=replace")
        if self.method != "auto":
            return self
        method = "repaint" if jumps and not inpainting else "replace"
        return Inpaint(self.source, self.fill, method, self.jump_length, self.jump_n_sample)

    def known(self, rows: slice, device: torch.device) -> Tensor:
        return known_pixels(to_unit_range(self.source[rows]).to(device), self.fill[rows].to(device))

    def sample(self, plan: SamplingPlan, denoise: Denoiser, z: Tensor, noise: Noise, rows: slice, record_every: int = 0,
               progress: bool = False) -> SampleOutput:
        x0 = to_unit_range(self.source[rows]).to(z.device)
        fill = self.fill[rows].to(z.device)

        def keep(x: Tensor, level: Level) -> Tensor:
            # x <- m x + (1 - m) x_t(source), m the pixels to fill: the kept ones at x's noise level
            return torch.where(fill, x, noised(x0, level, noise_like(x, noise)))

        if self.method == "auto":
            raise ValueError("Inpaint(method='auto'): resolve it with for_model first (generate does)")
        steps = plan.steps
        path = repaint_path(steps, self.jump_length, self.jump_n_sample) if self.method == "repaint" else list(range(steps + 1))
        out = walk(plan.sampler, denoise, plan.model.schedule, plan.levels, keep(plan.init_scale * z, plan.levels[0]), noise, path,
                   keep, record_every, progress)
        out.images = torch.where(fill, out.images, x0)  # the kept pixels exactly (the last keep did it; also in bf16)
        return out

    def finish(self, pixels: Tensor) -> Tensor:
        # the output stage (a palette snap) may move kept pixels too: they are the source's again
        return torch.where(self.fill.to(pixels.device), pixels, self.source.to(pixels.device))

    def record(self) -> dict:
        return {"edit": "inpaint", "method": self.method, "jump_length": self.jump_length, "jump_n_sample": self.jump_n_sample}


class Vary(Edit):
    """SDEdit (Meng et al. 2022): the source noised to ``strength`` of the chain, then denoised with the requested label
    and guidance. The last round(strength x S) of the sampler's S steps run (at least one), from
    x_t = alpha_t source + sigma_t z at the first of them, z the image's first draw: strength 1 is nearly a fresh
    sample from that noise, small strengths keep the source's shapes and colours. Same label: variations; another: class
    transfer."""

    def __init__(self, source: Tensor, strength: float = 0.5) -> None:
        self.strength = number("strength", strength, 0, 1, " (the share of the chain redone: 0.3 keeps the sprite close, 1.0 is a new one)")
        if self.strength == 0:
            raise ConfigError("strength=0 returns the source unchanged: give a strength in (0, 1], e.g. strength=0.5")
        if source.dtype != torch.uint8 or source.ndim != 4:
            raise ValueError(f"Vary: source uint8 (N, C, H, W), got {tuple(source.shape)} {source.dtype}")
        self.source = source

    def start(self, steps: int) -> int:
        """The position the walk starts from: S - round(strength S), at most S - 1."""
        return steps - max(1, round(self.strength * steps))

    def sample(self, plan: SamplingPlan, denoise: Denoiser, z: Tensor, noise: Noise, rows: slice, record_every: int = 0,
               progress: bool = False) -> SampleOutput:
        first = self.start(plan.steps)
        x = noised(to_unit_range(self.source[rows]).to(z.device), plan.levels[first], z)
        return walk(plan.sampler, denoise, plan.model.schedule, plan.levels, x, noise, range(first, plan.steps + 1), None,
                    record_every, progress)

    def record(self) -> dict:
        return {"edit": "vary", "strength": self.strength}


def slerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """Spherical interpolation per row: sin((1 - w) theta) / sin theta a + sin(w theta) / sin theta b, theta the angle
    between a and b (w = 0 gives a and w = 1 gives b exactly); linear where they are parallel."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    theta = cos.clamp(-1, 1).acos()
    w = w.double().to(a.device)
    small = theta.sin() < 1e-6
    wa = torch.where(small, 1 - w, ((1 - w) * theta).sin() / theta.sin())
    wb = torch.where(small, w, (w * theta).sin() / theta.sin())
    shape = (-1,) + (1,) * (a.ndim - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


class SlerpNoise:
    """Row b's draws: slerp(draw of stream A, draw of stream B, w_b): every step's noise interpolated as x_T is."""

    def __init__(self, a: Noise, b: Noise, weights: Tensor) -> None:
        self.a, self.b, self.weights = a, b, weights

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        return slerp(self.a.randn(shape, device, dtype), self.b.randn(shape, device, dtype), self.weights)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.device, x.dtype)


class Interpolate(Edit):
    """Frames between two samples: image i = weights[i] of the way from image ``ends[0]`` to image ``ends[1]`` (each
    (seed, index), the image sample.py makes as sample ``index`` with ``seed``), its x_T and every step's noise slerped
    between theirs; the contexts (interpolated by the caller) follow the same weights. Frames at weight 0 and 1 are the
    two ends' own samples."""

    def __init__(self, ends: Sequence[tuple[int, int]], weights: Tensor) -> None:
        if len(ends) != 2:
            raise ValueError(f"Interpolate: two ends (seed, index), got {ends}")
        self.ends, self.weights = [tuple(e) for e in ends], weights.double()

    def noise(self, streams: Callable[[int, Sequence[int]], Noise], seed: int, index: Sequence[int]) -> Noise:
        (seed_a, i_a), (seed_b, i_b) = self.ends
        return SlerpNoise(streams(seed_a, [i_a] * len(index)), streams(seed_b, [i_b] * len(index)),
                          self.weights[torch.as_tensor(list(index))])

    def sample(self, plan: SamplingPlan, denoise: Denoiser, z: Tensor, noise: Noise, rows: slice, record_every: int = 0,
               progress: bool = False) -> SampleOutput:
        return walk(plan.sampler, denoise, plan.model.schedule, plan.levels, plan.init_scale * z, noise,
                    record_every=record_every, progress=progress)

    def record(self) -> dict:
        return {"edit": "interpolate", "ends": [list(e) for e in self.ends], "weights": [round(float(w), 6) for w in self.weights]}

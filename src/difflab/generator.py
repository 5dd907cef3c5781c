"""A trained model and a sampling request as one traceable module: supplied noise (and labels) in, images out.

``SpriteGenerator`` runs the sampler's own ``sample`` (samplers/base.py: reset, then one ``step`` per timestep) on the
model's own ``denoiser`` (guidance and objective conversion included), so the export has no copy of the sampling math:
tracing unrolls the loop and the multistep solvers' Python state into one graph (difflab.export --format onnx). Every
standard normal draw comes from the ``noise`` input, in the order the sampler asks for them: x_T first, then one per
noisy step. With ``inpaint`` the graph also takes a source sprite and a mask and fills the masked pixels
(difflab.editing.Inpaint, its own ``sample``: the draws are then x_T and every draw of its walk, in order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflab.editing import Inpaint
from difflab.errors import ConfigError
from difflab.images import to_uint8
from difflab.model import DiffusionModel
from difflab.samplers.base import Sampler
from difflab.sampling import SamplingSpec
from difflab.schedules import NoiseSchedule


class SuppliedNoise:
    """noise (B, D, C, H, W) handed out as noise[:, 0], noise[:, 1], ... to anything that calls ``randn_like``
    (samplers/base.py's noise_like takes any such object)."""

    def __init__(self, noise: Tensor) -> None:
        self.noise, self.used = noise, 0

    def randn_like(self, x: Tensor) -> Tensor:
        if self.used >= self.noise.shape[1]:
            raise ValueError(f"the sampler asked for more than the {self.noise.shape[1]} noise draws supplied")
        z = self.noise[:, self.used]
        self.used += 1
        return z.to(x.dtype)


class PlannedSchedule:
    """The model's schedule with T as a plain int. Tracing records tensor sizes as graph values, but the samplers plan
    their timesteps from T in Python (numpy spacing, list indexing): they need the number. Everything else is the
    schedule's own (its buffers enter the graph as constants: the steps are fixed at export)."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule, self.timesteps = schedule, int(schedule.timesteps)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.schedule, name)


class CountingNoise:
    """Counts the draws a sampler makes (zeros: the count does not depend on the values)."""

    def __init__(self) -> None:
        self.count = 0

    def randn_like(self, x: Tensor) -> Tensor:
        self.count += 1
        return torch.zeros_like(x)


def exportable() -> list[str]:
    """The samplers whose loop is Sampler.sample's (fixed timesteps, state in Python): what tracing can unroll."""
    import difflab.samplers as samplers

    classes = [getattr(samplers, n) for n in samplers.__all__]
    return sorted(c.name for c in classes if isinstance(c, type) and issubclass(c, Sampler) and c.name and c.sample is Sampler.sample)


def traceable(sampler: Sampler) -> Sampler:
    if type(sampler).sample is not Sampler.sample:
        raise ConfigError(f"sampler {sampler.name or type(sampler).__name__} runs its own loop and cannot be exported: "
                          f"choose one of {', '.join(exportable())} (--sampler NAME)")
    return sampler


def noise_draws(sampler: Sampler, model: DiffusionModel, edit: Inpaint | None = None) -> int:
    """D: the standard normal draws one image takes, x_T plus one per noisy step (an inpainting walk: plus the kept
    pixels' re-noising and the jumps back), counted in a dry run on a zero denoiser."""
    counter = CountingNoise()
    x_T = counter.randn_like(torch.zeros(1, *model.image_shape, device=model.device))
    if edit is None:
        sampler.sample(lambda x, t: torch.zeros_like(x), model.schedule, x_T, counter)
    else:
        edit.sample(sampler, lambda x, t: torch.zeros_like(x), model.schedule, x_T, counter, slice(0, 1))
    return counter.count


def blank_inpaint(model: DiffusionModel, steps: int) -> Inpaint:
    """The inpainting the graph runs (method auto: one pass for a model tuned for inpainting, RePaint for another),
    resolved on a one-image stand-in; forward builds it again on the graph's inputs."""
    c, h, w = model.image_shape
    fill = torch.zeros(1, 1, h, w, dtype=torch.bool)
    fill[..., : h // 2, :] = True
    return Inpaint(torch.zeros(1, c, h, w, dtype=torch.uint8), fill).for_model(model.inpainting, steps)


class SpriteGenerator(nn.Module):
    """forward(noise (B, D, C, H, W) float32[, labels (B,) int64][, source (B, H, W, C) uint8, fill (B, H, W) uint8])
    -> images (B, C, H, W) float32 in [-1, 1] (the unclamped sampler output) and pixels (B, H, W, C) uint8
    (difflab.images.to_uint8, channels last as PNGs want). A conditional model takes class indices (one-hot contexts
    inside the graph); an unconditional one no labels. With ``inpaint``: the pixels where ``fill`` is nonzero are drawn,
    the others are the source's, exactly."""

    def __init__(self, model: DiffusionModel, spec: SamplingSpec, inpaint: bool = False) -> None:
        super().__init__()
        if model.dtype != torch.float32:
            raise ConfigError(f"the generator traces a float32 network, this one is {model.dtype}: load it with load_model")
        self.model, self.spec = model, spec
        model.denoiser(None, spec.guidance)  # a guidance the model refuses fails here, not in the middle of a trace
        self.sampler = traceable(spec.sampler_for(model))
        self.net = model.net.eval()  # registered: the weights are the module's own (one initializer each in the graph)
        self.schedule = PlannedSchedule(model.schedule)
        self.num_classes = model.num_classes
        self.inpaint = blank_inpaint(model, spec.steps_on(model)) if inpaint else None
        self.draws = noise_draws(self.sampler, model, self.inpaint)

    def forward(self, noise: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        context = None
        if self.num_classes:  # inputs: labels first
            # one-hot by comparison: plain ops in any exporter and runtime
            context = (inputs[0][:, None] == torch.arange(self.num_classes, device=noise.device)).float()
        supply = SuppliedNoise(noise)
        x_T = supply.randn_like(noise[:, 0])
        if self.inpaint is None:
            images = self.sampler.sample(self.model.denoiser(context, self.spec.guidance), self.schedule, x_T, supply).images
            return images, to_uint8(images).permute(0, 2, 3, 1)
        source, fill = inputs[-2:]
        plan = self.inpaint
        edit = Inpaint(source.permute(0, 3, 1, 2), (fill != 0)[:, None], plan.method, plan.jump_length, plan.jump_n_sample)
        rows = slice(None)  # every row (a slice by the traced batch size would fix it in the graph)
        known = edit.known(rows, noise.device) if self.model.inpainting else None
        images = edit.sample(self.sampler, self.model.denoiser(context, self.spec.guidance, known), self.schedule, x_T, supply,
                             rows).images
        return images, edit.finish(to_uint8(images)).permute(0, 2, 3, 1)

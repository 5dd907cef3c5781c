"""A trained model and a sampling request as one traceable module: supplied noise (and labels) in, images out.

``SpriteGenerator`` runs the samplers' one loop (samplers.base.walk) on the bound plan's grid and the model's own
denoiser (guidance and objective included), so the export has no copy of the sampling math: tracing unrolls the loop and
the multistep solvers' Python state into one graph (difflab.export --format onnx), for every sampler. Every standard
normal draw comes from the ``noise`` input, in the order the sampler asks for them: the first x first, then one per noisy
step (Heun's churn, DDPM's and consistency sampling's re-noising). With ``inpaint`` the graph also takes a source sprite
and a mask and fills the masked pixels (difflab.editing.Inpaint: the draws are then the first x and every draw of its
walk, in order).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.diffusion import Denoised, Level
from difflab.editing import Inpaint
from difflab.errors import ConfigError
from difflab.images import to_uint8
from difflab.model import DiffusionModel
from difflab.samplers.base import walk
from difflab.sampling import SamplingPlan, SamplingSpec


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


class CountingNoise:
    """Counts the draws a sampler makes (zeros: the count does not depend on the values)."""

    def __init__(self) -> None:
        self.count = 0

    def randn_like(self, x: Tensor) -> Tensor:
        self.count += 1
        return torch.zeros_like(x)


def zero_denoiser(x: Tensor, level: Level) -> Denoised:
    return Denoised(torch.zeros_like(x), torch.zeros_like(x))


def noise_draws(plan: SamplingPlan, edit: Inpaint | None = None) -> int:
    """D: the standard normal draws one image takes, the first x plus one per noisy step (an inpainting walk: plus the
    kept pixels' re-noising and the jumps back), counted in a dry run on a zero denoiser."""
    counter = CountingNoise()
    z = counter.randn_like(torch.zeros(1, *plan.model.image_shape, device=plan.model.device))
    if edit is None:
        walk(plan.sampler, zero_denoiser, plan.model.schedule, plan.levels, z, counter)
    else:
        edit.sample(plan, zero_denoiser, z, counter, slice(0, 1))
    return counter.count


def blank_inpaint(plan: SamplingPlan) -> Inpaint:
    """The inpainting the graph runs (method auto: one pass for a model tuned for inpainting, RePaint for another),
    resolved on a one-image stand-in; forward builds it again on the graph's inputs."""
    c, h, w = plan.model.image_shape
    fill = torch.zeros(1, 1, h, w, dtype=torch.bool)
    fill[..., : h // 2, :] = True
    return Inpaint(torch.zeros(1, c, h, w, dtype=torch.uint8), fill).for_model(plan.model.inpainting, plan.steps)


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
        self.plan = spec.bind(model)  # checks the request against the model before anything is traced
        self.net = self.plan.model.net.eval()  # registered: the weights are the module's own (one initializer each in the graph)
        self.num_classes = model.num_classes
        self.inpaint = blank_inpaint(self.plan) if inpaint else None
        self.draws = noise_draws(self.plan, self.inpaint)

    def forward(self, noise: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        plan = self.plan
        context = None
        if self.num_classes:  # inputs: labels first
            # one-hot by comparison: plain ops in any exporter and runtime
            context = (inputs[0][:, None] == torch.arange(self.num_classes, device=noise.device)).float()
        supply = SuppliedNoise(noise)
        z = supply.randn_like(noise[:, 0])
        if self.inpaint is None:
            images = walk(plan.sampler, plan.denoiser(context), plan.model.schedule, plan.levels, plan.init_scale * z, supply).images
            return images, to_uint8(images).permute(0, 2, 3, 1)
        source, fill = inputs[-2:]
        blank = self.inpaint
        edit = Inpaint(source.permute(0, 3, 1, 2), (fill != 0)[:, None], blank.method, blank.jump_length, blank.jump_n_sample)
        rows = slice(None)  # every row (a slice by the traced batch size would fix it in the graph)
        known = edit.known(rows, noise.device) if plan.model.inpainting else None
        images = edit.sample(plan, plan.denoiser(context, known), z, supply, rows).images
        return images, edit.finish(to_uint8(images)).permute(0, 2, 3, 1)

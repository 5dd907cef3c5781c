"""The one way to make samples: per-image noise, one inference precision, chunked generation.

sample.py, the SampleGrid and SampleQuality callbacks, evaluate.py and the benchmark all call ``generate``.
Image i has its own random stream, seeded by (seed, i) as in EDM's per-seed generators: its x_T and every
step's noise depend only on (seed, i), never on n, batch_size, chunking, the number of ranks or the entry
point. With its context, the sampler and the precision that fixes the image (up to the last float bits of
batched kernels, see the README).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from torch import Tensor, nn

from difflab.config import cpu_has_bf16
from difflab.errors import ConfigError
from difflab.images import PALETTES, data_palette, snap_to_palette, to_uint8
from difflab.objectives import Objective
from difflab.samplers.base import SampleOutput, Sampler
from difflab.samplers.guidance import guided_denoiser
from difflab.schedules import NoiseSchedule, sigma_to_t
from difflab.validate import integer, number

PRECISIONS = ("auto", "32", "bf16")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: eps = eps_c + scale (eps_c - eps_u), applied only for noise levels sigma in
    ``interval`` = [sigma_lo, sigma_hi] when given (Kynkaanniemi et al. 2024; sigma_t = sqrt((1 - ab_t) / ab_t)),
    with CFG rescale ``rescale`` (Lin et al. 2024; 0 = off, 0.7 in the paper)."""

    scale: float = 0.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0

    @classmethod
    def from_config(cls, scale: Any, interval: Any = None, rescale: Any = 0.0) -> Guidance:
        number("guidance", scale, hint=" (0: plain conditional, e.g. guidance=2)")
        number("guidance_rescale", rescale, 0, 1, " (0: off; Lin et al. use 0.7)")
        if interval is not None:
            lo_hi = list(interval) if isinstance(interval, Sequence) and not isinstance(interval, str) else []
            if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lo_hi) \
                    or not 0 <= lo_hi[0] < lo_hi[1]:
                raise ConfigError(f"guidance_interval={interval!r}: give [sigma_lo, sigma_hi] with 0 <= lo < hi "
                                  "(e.g. guidance_interval=[0.3,5]), or null to guide at every step")
            interval = (float(lo_hi[0]), float(lo_hi[1]))
        return cls(float(scale), interval, float(rescale))

    def denoiser(self, net: nn.Module, context: Tensor | None, schedule: NoiseSchedule) -> Any:
        t_interval = None
        if self.interval is not None:  # sigma -> (fractional) t on this schedule
            t_interval = (float(sigma_to_t(schedule, max(self.interval[0], 1e-12))), float(sigma_to_t(schedule, self.interval[1])))
        return guided_denoiser(net, context, self.scale, t_interval, self.rescale)


def guidance_of(cfg: Mapping[str, Any]) -> Guidance:
    """The guidance keys of sample.py / evaluate.py: guidance, guidance_interval, guidance_rescale."""
    interval = cfg.get("guidance_interval")
    return Guidance.from_config(cfg["guidance"], list(interval) if interval is not None else None, cfg.get("guidance_rescale", 0.0))


def check_output_stage(palette: str | None, colors: int = 16) -> None:
    """The palette= / palette_colors= keys, as typed."""
    if palette is None or palette == "auto":
        return
    if palette not in PALETTES:
        raise ConfigError(f"palette={palette}: choose one of {', '.join(PALETTES)}, auto (sprite for pixel art) or null (the raw samples)")
    integer("palette_colors", colors, 2, " (real sprites use about 8)")


def resolve_palette(palette: str | None, data_cfg: Mapping[str, Any] | None) -> str | None:
    """palette=auto (the default): sprite for a data set of pixel art (its DataModule says pixel_art = True: the
    sprites), null (the raw samples) for photographs such as CIFAR-10; any other value as given."""
    if palette != "auto":
        return palette
    target = (data_cfg or {}).get("_target_")
    return "sprite" if target and getattr(get_class(target), "pixel_art", False) else None


def output_stage(palette: str | None, colors: int = 16, data_images: Tensor | None = None) -> Callable[[Tensor], Tensor] | None:
    """palette=sprite: each sample snapped to its own ``colors`` colours; data: to the data set's ``colors`` most frequent
    colours (from its training images); null: the samples as the model made them."""
    check_output_stage(palette, colors)
    if palette is None:
        return None
    if palette == "sprite":
        return partial(snap_to_palette, colors=colors)
    if data_images is None:
        raise ConfigError("palette=data needs the data set's images")
    return partial(snap_to_palette, palette=data_palette(data_images, colors))


def effective_sampler(sampler_cfg: Any, steps: int | None) -> Any:
    """conf/sampler/'s config with steps= applied: the number of denoising steps for samplers that take one; samplers
    that run all T steps (ddpm) ignore it with a warning, in every entry point (so -m sweeps over samplers x steps run)."""
    sampler_cfg = sampler_cfg.copy()
    if steps is not None:
        if "steps" in sampler_cfg:
            sampler_cfg.steps = steps
        else:
            log.warning(f"{sampler_cfg._target_} runs all T steps: steps={steps} does not apply")
    return sampler_cfg


def image_seed(seed: int, index: int) -> int:
    # well-mixed 64-bit seeds: images (and runs with nearby seeds) never share a stream
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class ImageNoise:
    """Standard normal draws whose row b comes from the generator of image ``index[b]`` (CPU, float32: the same
    numbers on every device)."""

    def __init__(self, seed: int, index: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in index]

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """(len(index), *shape)."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(device, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.device, x.dtype)


def inference_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """precision: 32 | bf16 (a bf16 copy of the weights) | auto (bf16 where the hardware runs it fast)."""
    precision, device = str(precision), torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
        precision = "bf16" if fast else "32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def inference_net(net: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """The network in the inference dtype on ``device``: itself when nothing changes, else a copy (a training
    network keeps its float32 weights)."""
    dtype = inference_dtype(precision, device)
    p = next(net.parameters())
    if p.dtype == dtype and p.device == torch.device(device):
        return net
    return copy.deepcopy(net).to(device, dtype)


@torch.no_grad()
def generate(
    net: nn.Module,
    schedule: NoiseSchedule,
    sampler: Sampler,
    n: int,
    contexts: Tensor | None = None,
    guidance: float | Guidance = 0.0,
    seed: int = 0,
    index: Tensor | Sequence[int] | None = None,
    batch_size: int = 256,
    precision: str = "32",
    record_every: int = 0,
    progress: bool = False,
    shape: tuple[int, int, int] | None = None,
    objective: Objective | None = None,
) -> SampleOutput:
    """n images (float in [-1, 1], on the CPU) with contexts (n, K) or None; index: their global sample
    indices (default 0..n-1), which pick their noise. The network is used in ``precision`` on the schedule's
    device, the sampler's update math stays float32."""
    device = schedule.betas.device
    index = torch.arange(n) if index is None else torch.as_tensor(index).cpu()
    if len(index) != n or (contexts is not None and len(contexts) != n):
        raise ValueError(f"generate: n={n}, but {len(index)} indices and {len(contexts) if contexts is not None else 0} contexts")
    shape = shape or (net.in_channels, net.image_size, net.image_size)
    model = inference_net(net, precision, device)
    guidance = guidance if isinstance(guidance, Guidance) else Guidance(float(guidance))
    was_training = net.training
    model.eval()
    parts: list[SampleOutput] = []
    try:
        for start in range(0, n, batch_size):
            noise = ImageNoise(seed, index[start : start + batch_size].tolist())
            ctx = contexts[start : start + batch_size].to(device) if contexts is not None else None
            denoise = (objective or Objective()).eps_denoiser(guidance.denoiser(model, ctx, schedule), schedule)
            parts.append(sampler.sample(denoise, schedule, noise.randn(shape, device), noise, record_every, progress))
    finally:
        net.train(was_training)
    return SampleOutput(
        images=torch.cat([p.images.cpu() for p in parts]),
        chain=[torch.cat(frames) for frames in zip(*(p.chain for p in parts))],
        x0_chain=[torch.cat(frames) for frames in zip(*(p.x0_chain for p in parts))],
        chain_t=parts[0].chain_t,
    )


def proportional_labels(n: int, classes: Sequence[int], weights: Sequence[float] = ()) -> Tensor:
    """n labels: class c gets round(n w_c / sum w) of them (largest remainder), spread evenly over 0..n-1."""
    w = np.asarray(weights if len(weights) else [1.0] * len(classes), dtype=np.float64)
    quota = n * w / w.sum()
    counts = np.floor(quota).astype(int)
    counts[np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]] += 1
    # the j-th of m_c samples of class c sits at (j + 1/2) / m_c along the sequence
    keys = [((j + 0.5) / m, c) for c, m in zip(classes, counts) for j in range(m)]
    return torch.as_tensor([c for _, c in sorted(keys)], dtype=torch.long)


@dataclass
class SamplePlan:
    """The samples of an evaluation: sample i has label ``labels()[i]`` and is made in chunk i // batch_size.

    Labels follow the class frequencies of the real images the samples are compared with (FD/KID compare
    distributions: class-balanced samples against unbalanced data would be penalised for the label mix
    alone), spread evenly along the sample index. Rank r makes chunks r, r + W, r + 2W, ...: disjoint shares
    of the same images whatever W is (per-image noise).
    """

    n: int
    batch_size: int
    seed: int = 0
    num_classes: int = 0  # context width K; 0 = unconditional model
    classes: Sequence[int] = ()  # the classes to spread the samples over (all, or the trained subset)
    guidance: float | Guidance = 0.0
    weights: Sequence[float] = ()  # relative frequency of each entry of classes (the real data's); () = equal
    precision: str = "32"
    post: Callable[[Tensor], Tensor] | None = None  # an output stage on the uint8 images (output_stage)
    objective: Objective | None = None  # what the network predicts (eps when None)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def chunk_indices(self, chunk: int) -> Tensor:
        return torch.arange(chunk * self.batch_size, min((chunk + 1) * self.batch_size, self.n))

    @cached_property
    def all_labels(self) -> Tensor:
        return proportional_labels(self.n, self.classes, self.weights)

    def labels(self, index: Tensor) -> Tensor | None:
        return self.all_labels[index] if self.num_classes else None

    def chunks_for(self, rank: int, world: int) -> list[int]:
        """This rank's chunks; [-1] (make nothing) when there are fewer chunks than ranks."""
        return list(range(rank, self.n_chunks, world)) or [-1]

    def generate_chunk(self, net: nn.Module, schedule: NoiseSchedule, sampler: Sampler, chunk: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """-> (uint8 images (B, C, H, W) on the schedule's device, labels (B,) or None, sample indices (B,))."""
        device = schedule.betas.device
        index = self.chunk_indices(chunk)
        labels = self.labels(index)
        contexts = nn.functional.one_hot(labels, self.num_classes).float() if labels is not None else None
        out = generate(net, schedule, sampler, len(index), contexts, self.guidance, self.seed, index, len(index), self.precision,
                       objective=self.objective)
        images = to_uint8(out.images)
        images = (self.post(images) if self.post else images).to(device)
        return images, (labels.to(device) if labels is not None else None), index.to(device)


def trained_classes(data_cfg: Mapping[str, Any], class_names: Sequence[str]) -> list[int]:
    """The class indices the model saw: data.classes when it trained on a subset, else all."""
    subset = data_cfg.get("classes") if data_cfg else None
    return [list(class_names).index(c) for c in subset] if subset else list(range(len(class_names)))


def class_plan(n: int, batch_size: int, seed: int, num_classes: int, guidance: float | Guidance, data_cfg: Mapping[str, Any],
               datamodule: Any, precision: str = "32", **settings: Any) -> SamplePlan:
    """The plan for a model with num_classes contexts (0: unconditional), labels in the training data's proportions;
    settings: SamplePlan's other fields (post, objective)."""
    if not num_classes:
        return SamplePlan(n, batch_size, seed, 0, (), guidance, precision=precision, **settings)
    classes = trained_classes(data_cfg, datamodule.class_names)
    counts = datamodule.class_counts()
    return SamplePlan(n, batch_size, seed, num_classes, classes, guidance, [float(counts[c]) for c in classes], precision, **settings)

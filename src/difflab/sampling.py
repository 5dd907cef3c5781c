"""A sampling request (SamplingSpec, conf/sampling/), bound to its model once (SamplingPlan), and the one way to carry
it out (generate).

sample.py, edit.py, evaluate.py, the SampleGrid and SampleQuality callbacks, the ONNX export and the benchmark each build
one SamplingSpec, bind it (``plan = spec.bind(model)``: sampler, noise levels, precision, guidance, output stage and noise
streams resolved and checked there) and call ``generate(plan, ...)``. Image i has its own random stream, seeded by (seed, i) as in EDM's per-seed
generators: its x_T and every step's noise depend only on (seed, i), never on n, batch_size, chunking, the number of
ranks or the entry point. With its context, the sampler and the precision that fixes the image (up to the last float
bits of batched kernels, see docs/sampling.md, "Reproducible noise").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property, partial
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from difflab.config import cpu_has_bf16, cuda_has_bf16, plain
from difflab.diffusion import Denoiser, Level
from difflab.editing import Edit
from difflab.errors import ConfigError
from difflab.guidance import Guidance
from difflab.images import PALETTES, data_palette, snap_to_palette, to_uint8
from difflab.model import DiffusionModel
from difflab.rng import counter_normal
from difflab.samplers.base import SampleOutput, Sampler, walk
from difflab.samplers.consistency import ConsistencySampler
from difflab.validate import choice, integer

PRECISIONS = ("auto", "32", "bf16")
NOISES = ("auto", "generator", "counter")
log = logging.getLogger(__name__)


@dataclass(eq=False)
class SamplingSpec:
    """How to sample, checked once here: the sampler (conf/sampler/, with ``steps`` replacing its own steps; auto: one
    node per kind of model, DPM-Solver++ for a diffusion model and consistency sampling for a consistency model), guidance
    (scale, noise-level interval, CFG rescale), the inference precision, the output stage, the seed and the batch size.
    Each key is declared once, below: its check is in __post_init__, and records (SamplingPlan.record) carry it as typed.

    precision: 32 | bf16 (a bf16 copy of the weights; the sampler's update math stays float32) | auto (bf16 where the
    hardware runs it fast). palette: sprite (each sample snapped to its own ``palette_colors`` colours) | data (to the
    data set's most frequent ones) | None (the raw samples) | auto (sprite for pixel-art data, None for photos).
    """

    sampler: Any  # a conf/sampler/ node (auto: one per kind of model) or a built Sampler; built here: the Sampler, or None for auto
    steps: int | None = None
    guidance: float = 2.0
    guidance_interval: Sequence[float] | None = None
    guidance_rescale: float = 0.0
    precision: str = "auto"
    palette: str | None = "auto"
    palette_colors: int = 16
    seed: int = 0
    batch_size: int = 256
    noise: str = "auto"

    def __post_init__(self) -> None:
        self.seed = integer("seed", self.seed, 0)
        choice("noise", self.noise, NOISES, " (auto: counter on CUDA, generator on the CPU)")
        self.batch_size = integer("batch_size", self.batch_size, 1)
        self.steps = integer("steps", self.steps, 1) if self.steps is not None else None
        self.precision = choice("precision", str(self.precision), PRECISIONS)
        choice("palette", self.palette, (*PALETTES, "auto", None), " (auto: sprite for pixel art; null: the raw samples)")
        self.palette_colors = integer("palette_colors", self.palette_colors, 2, " (real sprites use about 8)")
        self.guide = Guidance(self.guidance, plain(self.guidance_interval), self.guidance_rescale)
        self.guidance, self.guidance_interval, self.guidance_rescale = self.guide.scale, self.guide.interval, self.guide.rescale
        if isinstance(self.sampler, Sampler) and self.steps is not None:
            raise ConfigError(f"steps={self.steps} with a built {type(self.sampler).__name__}: give the steps to the sampler itself")
        sampler = self.sampler if isinstance(self.sampler, Sampler) else plain(self.sampler)
        # sampler=auto (conf/sampler/auto.yaml): one node per kind of model, built for the model that is sampled
        self.auto = sampler if isinstance(sampler, dict) and "_target_" not in sampler else None
        self.sampler = None if self.auto else sampler if isinstance(sampler, Sampler) else instantiate(self._with_steps(sampler))
        self._built: dict[str, Sampler] = {}

    def _with_steps(self, sampler: dict[str, Any]) -> dict[str, Any]:
        # steps= is the number of denoising steps of samplers that take one; samplers that run all T steps (ddpm) ignore it
        # with a warning, so -m sweeps over samplers x steps run
        if self.steps is not None:
            if "steps" in sampler:
                return {**sampler, "steps": self.steps}
            log.warning(f"{sampler['_target_']} runs all T steps: steps={self.steps} does not apply")
        return sampler

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingSpec:
        """The spec of a config that holds conf/sampling/'s keys at its top level (sample.py, evaluate.py); values may
        interpolate the rest of the config (batch_size=${n})."""
        return instantiate({k: plain(cfg[k]) for k in ("_target_", "_recursive_", *cls.keys())})

    @classmethod
    def keys(cls) -> list[str]:
        """The request's keys (conf/sampling/'s, and a config's top-level keys in sample.py, evaluate.py, edit.py)."""
        return [f.name for f in fields(cls)]

    def dtype(self, device: torch.device | str) -> torch.dtype:
        """The network's dtype for this precision on ``device``."""
        precision = self.precision
        if precision == "auto":
            device = torch.device(device)
            fast = cuda_has_bf16() if device.type == "cuda" else cpu_has_bf16()
            precision = "bf16" if fast else "32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def counter_noise(self, device: torch.device | str) -> bool:
        """Whether images' noise comes from counter streams made on ``device`` (ImageNoise)."""
        return self.noise == "counter" or (self.noise == "auto" and torch.device(device).type == "cuda")

    def bind(self, model: DiffusionModel, data_images: Tensor | None = None) -> SamplingPlan:
        """This request resolved for ``model``, once: the sampler (sampler=auto: the one for its kind), its grid of noise
        levels on the model's schedule, the network in this request's precision on its device, the guidance it takes, the
        output stage (palette=data: the colours of ``data_images``, the caller's training images, else of the model's own
        training data) and the noise streams. Every check of request against model is here."""
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"a sampling request binds to a DiffusionModel (network + schedule + objective: difflab.model.load_model "
                            f"or build_model), not a {type(model).__name__}")
        few_step = model.objective.distilled_guidance is not None
        kind = "consistency" if few_step else "diffusion"
        if self.auto is not None and kind not in self._built:
            self._built[kind] = instantiate(self._with_steps(self.auto[kind]))
        sampler = self._built[kind] if self.auto is not None else self.sampler
        name = model.source or "this model"
        if isinstance(sampler, ConsistencySampler) and not few_step:
            raise ConfigError(f"sampler=consistency samples consistency models only; {name} is a diffusion model: tune one "
                              "(python train.py experiment=sprites_consistency init_from=<it>) or choose another sampler")
        if few_step and not isinstance(sampler, ConsistencySampler):
            raise ConfigError(f"{name} is a consistency model: sample it with sampler=consistency (or sampler=auto), not "
                              f"{sampler.name or type(sampler).__name__}")
        guidance = self.guide
        if few_step:  # the guidance is in its weights: one plain network call
            distilled = model.objective.distilled_guidance
            if (guidance.scale, guidance.interval, guidance.rescale) != (distilled, None, 0.0):
                raise ConfigError(f"{name} has guidance {distilled:g} distilled in: sample it with guidance={distilled:g} and no "
                                  "guidance_interval or guidance_rescale, or sample the model it was tuned from")
            guidance = Guidance()
        levels = sampler.levels(model.schedule)
        palette = self.palette_for(model)
        stage = None
        if palette == "sprite":
            stage = partial(snap_to_palette, colors=self.palette_colors)
        elif palette == "data":
            images = data_images if data_images is not None else model.training_images()
            stage = partial(snap_to_palette, palette=data_palette(images, self.palette_colors))
        device = model.device
        return SamplingPlan(self, model.for_inference(self.dtype(device)), sampler, levels, guidance, stage,
                            self.counter_noise(device))

    def palette_for(self, model: DiffusionModel) -> str | None:
        if self.palette == "auto":
            return "sprite" if model.pixel_art else None
        return self.palette


class SamplingPlan:
    """A SamplingSpec bound to one model (SamplingSpec.bind): what generate, the editing walks, the callbacks, evaluate.py
    and the ONNX export all sample with. ``model``: the model in the request's precision; ``levels``: the sampler's grid,
    the last the clean image; ``guidance``: what the network is guided with; ``stage``: the output stage or None."""

    def __init__(self, spec: SamplingSpec, model: DiffusionModel, sampler: Sampler, levels: list[Level], guidance: Guidance,
                 stage: Callable[[Tensor], Tensor] | None, counter: bool) -> None:
        self.spec, self.model, self.sampler, self.levels = spec, model, sampler, levels
        self.guidance, self.stage, self.counter = guidance, stage, counter
        self.seed, self.batch_size = spec.seed, spec.batch_size
        top = levels[0]
        # the first x: pure noise at the marginal's scale sqrt(alpha^2 + sigma^2) for unit-variance data (1 on VP and
        # rectified flow, sqrt(1 + sigma_max^2) on EDM's schedule)
        self.init_scale = math.sqrt(top.alpha**2 + top.sigma**2)

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    @property
    def name(self) -> str:
        return self.sampler.name or type(self.sampler).__name__.removesuffix("Sampler").lower()

    def denoiser(self, context: Tensor | None = None, known: Tensor | None = None) -> Denoiser:
        return self.model.denoiser(context, self.guidance, known)

    def record(self) -> dict[str, Any]:
        """The request as it applies to this model (JSON): every key of the spec as typed, with what it resolved to here
        (the sampler's name and settings, the steps taken, the dtype, the palette, the noise streams); in sample.py's
        meta.json and evaluate.py's run key."""
        spec, palette = self.spec, self.spec.palette_for(self.model)
        typed = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "sampler"}
        return {**typed, "sampler": self.name, "sampler_settings": self.sampler.settings(), "steps": self.steps,
                "steps_requested": spec.steps, "guidance_interval": list(spec.guidance_interval) if spec.guidance_interval else None,
                "dtype": str(self.model.dtype).removeprefix("torch."), "palette": palette,
                "palette_colors": spec.palette_colors if palette else None, "noise": "counter" if self.counter else "generator"}

    def row(self) -> dict[str, Any]:
        """The request as columns of a results table (evaluate.py's results.csv and sweep tables)."""
        r = self.record()
        return {"sampler": r["sampler"], "steps": r["steps"], "steps_requested": r["steps_requested"], "guidance": r["guidance"],
                "guidance_interval": str(self.spec.guidance_interval or ""), "guidance_rescale": r["guidance_rescale"],
                "palette": f"{r['palette']}:{r['palette_colors']}" if r["palette"] else "", "seed": r["seed"],
                "batch_size": r["batch_size"], "precision": r["dtype"]}


def image_seed(seed: int, index: int) -> int:
    # well-mixed 64-bit seeds: images (and runs with nearby seeds) never share a stream
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class ImageNoise:
    """Standard normal draws whose row b comes from the stream of image ``index[b]``, seeded by (seed, index[b]).

    counter=False: one torch.Generator per image, drawn on the CPU (float32: the same numbers on every device) and copied
    to the device. counter=True: difflab.rng.counter_normal, made on the device itself from (image seed, draw number),
    with no per-image loop and no copy: SamplingSpec's noise=auto takes it on CUDA. The two give other numbers (the same
    distribution); each is reproducible on its own."""

    def __init__(self, seed: int, index: Sequence[int], counter: bool = False) -> None:
        self.counter = counter
        self.keys = [image_seed(seed, int(i)) for i in index]
        self.draws = 0  # counter streams: how many draws so far (every image takes part in every draw)
        self.generators = [] if counter else [torch.Generator().manual_seed(k) for k in self.keys]

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """(len(index), *shape)."""
        if self.counter:
            self.draws += 1
            return counter_normal(self.keys, self.draws - 1, tuple(shape), device).to(dtype)
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(device, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.device, x.dtype)


@torch.no_grad()
def generate(plan: SamplingPlan, contexts: Tensor | None = None, n: int | None = None, index: Tensor | Sequence[int] | None = None,
             record_every: int = 0, progress: bool = False, edit: Edit | None = None) -> SampleOutput:
    """Images for contexts (N, K), or n unconditional ones, as ``plan`` (SamplingSpec.bind) says; index: their global
    sample indices (default 0..N-1), which pick their noise. ``images``: float in [-1, 1] on the CPU; ``pixels``: uint8
    after the plan's output stage. The network runs on the model's device, in chunks of the plan's batch size. ``edit``
    (difflab.editing: inpainting, variations, interpolation) starts and walks each chunk its own way, row i editing its
    source i."""
    if not isinstance(plan, SamplingPlan):
        raise TypeError(f"generate samples a SamplingPlan (SamplingSpec(...).bind(model), model a DiffusionModel: "
                        f"difflab.model.load_model or build_model), not a {type(plan).__name__}")
    model = plan.model
    n = len(contexts) if n is None and contexts is not None else n
    if n is None:
        raise ValueError("generate: give contexts (N, K), or n for an unconditional model")
    index = torch.arange(n) if index is None else torch.as_tensor(index).cpu()
    if len(index) != n or (contexts is not None and len(contexts) != n):
        raise ValueError(f"generate: n={n}, but {len(index)} indices and {len(contexts) if contexts is not None else 0} contexts")
    device = model.device
    edit = edit.for_model(model.inpainting, plan.steps) if edit is not None else None
    was_training = model.net.training
    model.net.eval()
    parts: list[SampleOutput] = []
    try:
        streams = partial(ImageNoise, counter=plan.counter)
        for start in range(0, n, plan.batch_size):
            rows = slice(start, start + plan.batch_size)
            chunk = index[rows].tolist()
            noise = edit.noise(streams, plan.seed, chunk) if edit is not None else streams(plan.seed, chunk)
            ctx = contexts[rows].to(device) if contexts is not None else None
            z = noise.randn(model.image_shape, device)
            denoise = plan.denoiser(ctx, edit.known(rows, device) if edit is not None and model.inpainting else None)
            if edit is not None:
                parts.append(edit.sample(plan, denoise, z, noise, rows, record_every, progress))
            else:
                parts.append(walk(plan.sampler, denoise, model.schedule, plan.levels, plan.init_scale * z, noise,
                                  record_every=record_every, progress=progress))
    finally:
        model.net.train(was_training)
    images = torch.cat([p.images.cpu() for p in parts])
    pixels = plan.stage(to_uint8(images)) if plan.stage else to_uint8(images)
    return SampleOutput(
        images=images,
        chain=[torch.cat(frames) for frames in zip(*(p.chain for p in parts))],
        x0_chain=[torch.cat(frames) for frames in zip(*(p.x0_chain for p in parts))],
        chain_t=parts[0].chain_t,
        pixels=edit.finish(pixels) if edit is not None else pixels,
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
class EvalPlan:
    """The samples of an evaluation: sample i has label ``labels()[i]`` and is made in chunk i // batch_size.

    Labels follow the class frequencies of the real images the samples are compared with (FD/KID compare
    distributions: class-balanced samples against unbalanced data would be penalised for the label mix
    alone), spread evenly along the sample index. Rank r makes chunks r, r + W, r + 2W, ...: disjoint shares
    of the same images whatever W is (per-image noise).
    """

    n: int
    batch_size: int
    num_classes: int = 0  # context width K; 0 = unconditional model
    classes: Sequence[int] = ()  # the classes to spread the samples over (all, or the trained subset)
    weights: Sequence[float] = ()  # relative frequency of each entry of classes (the real data's); () = equal

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def chunk_indices(self, chunk: int) -> Tensor:
        size = self.batch_size
        return torch.arange(chunk * size, min((chunk + 1) * size, self.n))

    @cached_property
    def all_labels(self) -> Tensor:
        return proportional_labels(self.n, self.classes, self.weights)

    def labels(self, index: Tensor) -> Tensor | None:
        return self.all_labels[index] if self.num_classes else None

    def chunks_for(self, rank: int, world: int) -> list[int]:
        """This rank's chunks; [-1] (make nothing) when there are fewer chunks than ranks."""
        return list(range(rank, self.n_chunks, world)) or [-1]

    def generate_chunk(self, plan: SamplingPlan, chunk: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """-> (uint8 images (B, C, H, W) after the output stage, on the model's device, labels (B,) or None, indices (B,))."""
        device = plan.model.device
        index = self.chunk_indices(chunk)
        labels = self.labels(index)
        contexts = nn.functional.one_hot(labels, self.num_classes).float() if labels is not None else None
        out = generate(plan, contexts, len(index), index)
        return out.pixels.to(device), (labels.to(device) if labels is not None else None), index.to(device)


def trained_classes(data_cfg: Mapping[str, Any], class_names: Sequence[str]) -> list[int]:
    """The class indices the model saw: data.classes when it trained on a subset, else all."""
    subset = data_cfg.get("classes") if data_cfg else None
    return [list(class_names).index(c) for c in subset] if subset else list(range(len(class_names)))


def eval_plan(n: int, spec: SamplingSpec, model: DiffusionModel, data_cfg: Mapping[str, Any], datamodule: Any) -> EvalPlan:
    """The evaluation of ``model`` (its contexts; none for an unconditional one), labels in the proportions of the set-up
    ``datamodule``'s training data."""
    if not model.num_classes:
        return EvalPlan(n, spec.batch_size)
    classes = trained_classes(data_cfg, datamodule.class_names)
    counts = datamodule.class_counts()
    return EvalPlan(n, spec.batch_size, model.num_classes, classes, [float(counts[c]) for c in classes])

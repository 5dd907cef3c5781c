"""Which samples to make for an evaluation, split over ranks so that the union never depends on the world size.

Sample i belongs to chunk i // batch_size; a chunk is generated in one call with a seed derived from
(seed, chunk). Labels follow the class frequencies of the real images the samples are compared with
(FD/KID compare distributions: class-balanced samples against unbalanced data would be penalised for
the label mix alone), spread evenly along the sample index. Rank r makes chunks r, r + W, r + 2W, ...:
disjoint shares, and the same images whatever W is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from difflab.generate import generate, to_uint8
from difflab.samplers.base import Sampler
from difflab.schedules import NoiseSchedule


@dataclass
class SamplePlan:
    n: int
    batch_size: int
    seed: int = 0
    num_classes: int = 0  # context width K; 0 = unconditional model
    classes: Sequence[int] = ()  # the classes to spread the samples over (all, or the trained subset)
    guidance: float = 0.0
    weights: Sequence[float] = ()  # relative frequency of each entry of classes (the real data's); () = equal

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def chunk_indices(self, chunk: int) -> Tensor:
        return torch.arange(chunk * self.batch_size, min((chunk + 1) * self.batch_size, self.n))

    def chunk_seed(self, chunk: int) -> int:
        # well-mixed 32-bit seeds: chunks (and runs with nearby seeds) never share noise
        return int(np.random.SeedSequence([self.seed, chunk]).generate_state(1)[0])

    def labels(self, index: Tensor) -> Tensor | None:
        if not self.num_classes:
            return None
        return proportional_labels(self.n, self.classes, self.weights)[index]

    def chunks_for(self, rank: int, world: int) -> list[int]:
        """This rank's chunks; [-1] (make nothing) when there are fewer chunks than ranks."""
        return list(range(rank, self.n_chunks, world)) or [-1]


def proportional_labels(n: int, classes: Sequence[int], weights: Sequence[float] = ()) -> Tensor:
    """n labels: class c gets round(n w_c / sum w) of them (largest remainder), spread evenly over 0..n-1."""
    w = np.asarray(weights if len(weights) else [1.0] * len(classes), dtype=np.float64)
    quota = n * w / w.sum()
    counts = np.floor(quota).astype(int)
    counts[np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]] += 1
    # the j-th of m_c samples of class c sits at (j + 1/2) / m_c along the sequence
    keys = [((j + 0.5) / m, c) for c, m in zip(classes, counts) for j in range(m)]
    return torch.as_tensor([c for _, c in sorted(keys)], dtype=torch.long)


def generate_chunk(net: nn.Module, schedule: NoiseSchedule, sampler: Sampler, plan: SamplePlan, chunk: int,
                   autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """-> (uint8 images (B, C, H, W) on the schedule's device, labels (B,) or None, sample indices (B,))."""
    device = schedule.betas.device
    index = plan.chunk_indices(chunk)
    labels = plan.labels(index)
    contexts = nn.functional.one_hot(labels, plan.num_classes).float() if labels is not None else None
    shape = (net.in_channels, net.image_size, net.image_size)
    out = generate(net, schedule, sampler, len(index), shape, contexts, plan.guidance, plan.chunk_seed(chunk),
                   batch_size=len(index), autocast_dtype=autocast_dtype)
    images = to_uint8(out.images).to(device)
    return images, (labels.to(device) if labels is not None else None), index.to(device)


def trained_classes(data_cfg: Mapping[str, Any], class_names: Sequence[str]) -> list[int]:
    """The class indices the model saw: data.classes when it trained on a subset, else all."""
    subset = data_cfg.get("classes") if data_cfg else None
    return [list(class_names).index(c) for c in subset] if subset else list(range(len(class_names)))


def class_plan(n: int, batch_size: int, seed: int, num_classes: int, guidance: float, data_cfg: Mapping[str, Any],
               datamodule: Any) -> SamplePlan:
    """The plan for a model with num_classes contexts (0: unconditional), labels in the training data's proportions."""
    if not num_classes:
        return SamplePlan(n, batch_size, seed, 0, (), guidance)
    classes = trained_classes(data_cfg, datamodule.class_names)
    counts = datamodule.class_counts()
    return SamplePlan(n, batch_size, seed, num_classes, classes, guidance, [float(counts[c]) for c in classes])


def dataset_name(data_cfg: Mapping[str, Any]) -> str:
    """A short name for file names and hints: cifar10, or the stem of the sprite file."""
    target = str(data_cfg.get("_target_", ""))
    if target.endswith("CIFAR10DataModule"):
        return "cifar10"
    if data_cfg.get("path"):
        return str(data_cfg["path"]).replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]
    return target.rsplit(".", 1)[-1] or "data"


def data_choice(data_cfg: Mapping[str, Any]) -> str:
    """The data=... option that reproduces this data set, for messages."""
    name = dataset_name(data_cfg)
    return "cifar10" if name == "cifar10" else "sprites_course" if "sprites_course" in str(data_cfg.get("path", "")) else "sprites"

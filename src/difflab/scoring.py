"""Scoring a model's samples: ``score`` (a rank's chunks of an EvalPlan, sampled and scored; the metric states are
gathered across ranks), the ScoringModule that runs it as a Lightning test run on every rank (evaluate.py), and
FinalEval, the quality of a training run's final EMA weights (train.py). results.py writes what they find."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from difflab.errors import DifflabError
from difflab.metrics.suite import MetricsConfig, MetricsContext
from difflab.model import DiffusionModel, load_model
from difflab.sampling import EvalPlan, SamplingPlan, SamplingSpec, eval_plan
from difflab.validate import integer

log = logging.getLogger(__name__)


def score(plan: SamplingPlan, samples: EvalPlan, context: MetricsContext, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """This rank's chunks of ``samples``, made as ``plan`` says, scored; with world > 1 every rank must call it (the
    states are gathered). world = 1 scores alone, also inside a distributed run (the final scores, on rank 0 after
    training)."""
    metrics = context.new_metrics(rank, world, plan.seed, sync=world > 1)
    for chunk in samples.chunks_for(rank, world):
        if chunk >= 0:
            metrics.update(*samples.generate_chunk(plan, chunk))
    return metrics.compute()


def save_scores(path: Path, values: Mapping[str, Any], context: MetricsContext) -> Path:
    """scores.npz: every sample's features, label, predicted class and nearest-training-image distance (sample order),
    with the real features' mean and covariance: what a report's bootstrap over the images recomputes FD and accuracy
    from (difflab.metrics.intervals)."""
    real = context.real.double().cpu().numpy()
    arrays = {"features": values["_features"].numpy(), "real_mu": real.mean(0), "real_sigma": np.cov(real, rowvar=False)}
    for key in ("labels", "predictions", "distance"):
        if f"_{key}" in values:
            arrays[key] = values[f"_{key}"].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


class _Chunks(DistributedSampler):
    """This rank's chunk positions as they are: a DistributedSampler, so Lightning does not re-split them
    (its own would pad the shares by repeating samples)."""

    def __init__(self, dataset: list[int]) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)

    def __iter__(self):
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


class ScoringModule(L.LightningModule):
    """evaluate.py's test run: every rank binds ``spec`` to the model on its own device and makes and scores its chunks
    of ``samples``. ``data_images``: the training images (palette=data takes their colours)."""

    def __init__(self, model: DiffusionModel, spec: SamplingSpec, samples: EvalPlan, context: MetricsContext,
                 data_images: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.spec, self.samples, self.context, self.data_images = model, spec, samples, context, data_images
        self.net, self.schedule = model.net, model.schedule  # children: Lightning moves them to this rank's device
        self.plan: SamplingPlan | None = None
        self.results: dict[str, Any] = {}
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # this rank's (images, labels, index)
        self.made: dict[str, np.ndarray] = {}  # all ranks' samples in index order, on rank 0
        self.seconds = 0.0

    def test_dataloader(self) -> DataLoader:
        chunks = self.samples.chunks_for(self.global_rank, self.trainer.world_size)
        return DataLoader(chunks, batch_size=None, sampler=_Chunks(chunks))

    def on_test_start(self) -> None:
        self.plan = self.spec.bind(self.model, self.data_images)
        self.context.feature_net.to(self.device)
        if self.context.classifier is not None:
            self.context.classifier.to(self.device)
        self.context.device = self.device
        self.metrics = self.context.new_metrics(self.global_rank, self.trainer.world_size, self.plan.seed)
        self.start = time.perf_counter()

    def test_step(self, chunk: Any, batch_idx: int) -> None:
        chunk = int(chunk)
        if chunk < 0:
            return
        images, labels, index = self.samples.generate_chunk(self.plan, chunk)
        self.metrics.update(images, labels, index)
        self.parts.append((images.cpu(), labels.cpu() if labels is not None else None, index.cpu()))

    def on_test_epoch_end(self) -> None:
        self.results = self.metrics.compute()
        self.seconds = time.perf_counter() - self.start  # after the gather: the slowest rank's sampling + scoring
        parts = self.parts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        if self.trainer.is_global_zero and parts:
            index = torch.cat([p[2] for p in parts])
            order = index.argsort()
            labels = [p[1] for p in parts if p[1] is not None]
            self.made = {"images": torch.cat([p[0] for p in parts])[order].permute(0, 2, 3, 1).numpy(),  # (N, H, W, C)
                            "index": index[order].numpy()}
            if labels:
                # one-hot contexts (N, K) float32, as sample.py and the data set files
                self.made["labels"] = torch.nn.functional.one_hot(torch.cat(labels)[order], self.samples.num_classes).float().numpy()


@dataclass
class Scored:
    """What FinalEval found: the plan it sampled (the model in it), the figures, the per-sample arrays ("_features",
    "_labels", ...) and the metrics context (its real features)."""

    plan: SamplingPlan
    values: dict[str, Any]
    samples: dict[str, Any]
    context: MetricsContext
    seconds: float


class FinalEval:
    """When training ends: the run's final EMA weights, loaded from its last checkpoint as evaluate.py loads them, sampled
    (``sampling``, conf/sampling/) and scored (``metrics``, conf/metrics/) as evaluate.py does, n samples with labels in
    the training data's proportions. conf/final_eval/; final_eval=none switches it off."""

    def __init__(self, sampling: SamplingSpec, metrics: Mapping[str, Any] | MetricsConfig | None = None, n: int = 1000) -> None:
        self.spec = sampling
        self.metrics_cfg = MetricsConfig.from_mapping(metrics)
        self.n = integer("final_eval.n", n, 2, " (FD needs at least 2 samples; final_eval=none: no final scores)")

    def __call__(self, ckpt: Path, datamodule: Any, device: torch.device) -> Scored | None:
        """None, with a warning, when the data set has no network to score with (the warning says how to train one):
        the run itself has ended well either way."""
        start = time.perf_counter()
        model = load_model(ckpt).to(device)
        try:
            context = MetricsContext(self.metrics_cfg, datamodule, model.data or datamodule.identity(), conditional=model.num_classes > 0,
                                     device=device)
        except DifflabError as err:
            log.warning(f"final_eval skipped: {err}")
            return None
        plan = self.spec.bind(model, datamodule.train_set.tensors[0])
        values = score(plan, eval_plan(self.n, self.spec, model, model.config.get("data") or {}, datamodule), context)
        seconds = time.perf_counter() - start
        figures = {k: v for k, v in values.items() if not k.startswith("_")}
        log.info(f"final quality ({self.n} samples, EMA weights, {seconds:.0f} s): "
                 + ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if "/" not in k))
        return Scored(plan, figures, {k: v for k, v in values.items() if k.startswith("_")}, context, seconds)

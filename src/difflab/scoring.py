"""Scoring a model's samples on every rank: a Lightning test run over the chunks of a SamplePlan, each rank making
its share and updating the metrics (their states gathered across ranks), rank 0 collecting every sample in index
order. evaluate.py runs it; results.py writes what it found."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from difflab.metrics.suite import MetricsContext
from difflab.model import DiffusionModel
from difflab.sampling import SamplePlan


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
    def __init__(self, model: DiffusionModel, plan: SamplePlan, context: MetricsContext) -> None:
        super().__init__()
        self.model, self.plan, self.context = model, plan, context
        self.net, self.schedule = model.net, model.schedule  # children: Lightning moves them to this rank's device
        self.results: dict[str, Any] = {}
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # this rank's (images, labels, index)
        self.samples: dict[str, np.ndarray] = {}  # all ranks' samples in index order, on rank 0
        self.seconds = 0.0

    def test_dataloader(self) -> DataLoader:
        chunks = self.plan.chunks_for(self.global_rank, self.trainer.world_size)
        return DataLoader(chunks, batch_size=None, sampler=_Chunks(chunks))

    def on_test_start(self) -> None:
        self.model = self.model.for_inference(self.plan.spec.dtype(self.device))
        self.context.feature_net.to(self.device)
        if self.context.classifier is not None:
            self.context.classifier.to(self.device)
        self.context.device = self.device
        self.metrics = self.context.new_metrics(self.global_rank, self.trainer.world_size, self.plan.spec.seed)
        self.start = time.perf_counter()

    def test_step(self, chunk: Any, batch_idx: int) -> None:
        chunk = int(chunk)
        if chunk < 0:
            return
        images, labels, index = self.plan.generate_chunk(self.model, chunk)
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
            self.samples = {"images": torch.cat([p[0] for p in parts])[order].permute(0, 2, 3, 1).numpy(),  # (N, H, W, C)
                            "index": index[order].numpy()}
            if labels:
                # one-hot contexts (N, K) float32, as sample.py and the data set files
                self.samples["labels"] = torch.nn.functional.one_hot(torch.cat(labels)[order], self.plan.num_classes).float().numpy()

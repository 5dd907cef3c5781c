"""Training-time sample quality: every N validation epochs, FD/KID/conditional accuracy of a small sample set
from the EMA weights, logged as val/fd, val/kid, val/cond_acc (ModelCheckpoint can monitor val/fd).

Like SampleGrid it runs after the first validation batch, while the WeightAveraging callback has the EMA
weights swapped in. Under DDP every rank samples its share and the metric states are gathered, so every
rank must (and does) take part.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from difflab.callbacks import autocast_dtype, due_this_epoch
from difflab.config import PROJECT_ROOT
from difflab.metrics.sampling import class_plan, generate_chunk
from difflab.metrics.suite import MetricsConfig, MetricsContext, resolve_dirs
from difflab.samplers.base import Sampler

log = logging.getLogger(__name__)


class SampleQuality(L.Callback):
    """``metric_settings``: the keys of conf/metrics/ (feature, classifier_ckpt, cache_dir, threshold, ...)."""

    def __init__(self, sampler: Sampler, every_n_epochs: int = 10, n: int = 256, batch_size: int = 128, seed: int = 0,
                 guidance: float = 0.0, log_per_class: bool = False, **metric_settings: Any) -> None:
        self.sampler = sampler
        self.every_n_epochs = every_n_epochs
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.guidance = guidance
        self.log_per_class = log_per_class
        self.metrics_cfg = resolve_dirs(MetricsConfig.from_mapping(metric_settings), PROJECT_ROOT)
        self.context: MetricsContext | None = None
        self.last: dict[str, Any] = {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # the same decision on every rank: all of them sample, or none
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not due_this_epoch(trainer, self.every_n_epochs):
            return
        values = self.evaluate(trainer, pl_module)
        for key, value in values.items():
            if key.startswith("_") or (key.startswith("cond_acc/") and not self.log_per_class):
                continue
            pl_module.log(f"val/{key}", value, on_step=False, on_epoch=True, batch_size=1, sync_dist=False)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        net, schedule = pl_module.net, pl_module.schedule
        data_cfg = (getattr(pl_module, "run_config", None) or {}).get("data") or {}
        k = getattr(net, "num_classes", 0)
        if self.context is None:  # built on first use: the classifier and real features cost nothing until then
            self.context = MetricsContext(self.metrics_cfg, trainer.datamodule, data_cfg, conditional=k > 0, device=pl_module.device)
        ctx = self.context
        plan = class_plan(self.n, self.batch_size, self.seed, k, self.guidance, data_cfg, trainer.datamodule)
        metrics = ctx.new_metrics(trainer.global_rank, trainer.world_size, self.seed)
        for chunk in plan.chunks_for(trainer.global_rank, trainer.world_size):
            if chunk >= 0:
                images, labels, index = generate_chunk(net, schedule, self.sampler, plan, chunk, autocast_dtype(trainer))
                metrics.update(images, labels, index)
        self.last = metrics.compute()
        shown = {k: round(v, 4) for k, v in self.last.items() if isinstance(v, float) and "/" not in k}
        log.info(f"epoch {trainer.current_epoch}: sample quality ({self.n} samples, EMA weights) {shown}")
        return self.last

"""Callbacks that sample during training, from the EMA weights: grids (and the denoising chain) to disk and to
the loggers, and sample quality (FD/KID/accuracy) to the logged metrics. Both bind a SamplingSpec (conf/sampling/) to the
LightningModule's DiffusionModel and sample it with difflab.sampling.generate, as sample.py and evaluate.py do, output
stage included: a training-time val/fd is evaluate.py's at the same settings.

They run after the first validation batch, while the WeightAveraging callback has the EMA weights swapped in,
whatever the order of the callbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from difflab.images import grid, save_gif, save_png
from difflab.loggers import log_image
from difflab.metrics.suite import MetricsConfig, MetricsContext
from difflab.sampling import SamplingSpec, eval_plan, generate
from difflab.scoring import score

log = logging.getLogger(__name__)


def due_this_epoch(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Every n-th epoch, and the last one (so a run always ends with an evaluation): the last of max_epochs, or the
    epoch that reaches max_steps (a time-budgeted run's, see budget.py)."""
    last_epoch = (trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1) or (
        trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
    return (trainer.current_epoch + 1) % every_n_epochs == 0 or last_epoch


def class_contexts(num_classes: int, per_class: int) -> torch.Tensor:
    """One-hot contexts, ``per_class`` per class, class-major: one grid row per class."""
    return torch.eye(num_classes).repeat_interleave(per_class, 0)


class _ValidationSampler(L.Callback):
    """What both callbacks share: a sampling request, and when they run: after the first validation batch of every
    ``every_n_epochs``-th epoch and of the last."""

    def __init__(self, sampling: SamplingSpec, every_n_epochs: int) -> None:
        self.spec = sampling
        self.every_n_epochs = every_n_epochs

    def due(self, trainer: L.Trainer, batch_idx: int, dataloader_idx: int) -> bool:
        first = batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking
        return first and due_this_epoch(trainer, self.every_n_epochs)


class SampleGrid(_ValidationSampler):
    """Every ``every_n_epochs`` validation epochs (and the last), a fixed-seed grid: one row per class."""

    def __init__(self, sampling: SamplingSpec, every_n_epochs: int = 5, per_class: int = 8, n_uncond: int = 64, chain: bool = True,
                 chain_every: int = 1) -> None:
        super().__init__(sampling, every_n_epochs)
        self.per_class = per_class
        self.n_uncond = n_uncond
        self.chain = chain
        self.chain_every = chain_every

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero and self.due(trainer, batch_idx, dataloader_idx):
            self.render(trainer, pl_module)

    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        model = pl_module.model
        k = model.num_classes
        contexts = class_contexts(k, self.per_class) if k else None
        nrow = self.per_class if k else 8
        plan = self.spec.bind(model, trainer.datamodule.train_set.tensors[0])
        out = generate(plan, contexts, None if k else self.n_uncond, record_every=self.chain_every if self.chain else 0)
        tag = f"epoch{trainer.current_epoch:04d}_step{trainer.global_step:07d}"
        folder = Path(trainer.default_root_dir) / "samples"
        image = grid(out.pixels, nrow)
        path = save_png(image, folder / f"{tag}.png")
        gif = None
        if self.chain and out.chain:
            gif = save_gif([grid(x, nrow) for x in out.chain], folder / f"{tag}_chain.gif")
            save_gif([grid(x, nrow) for x in out.x0_chain], folder / f"{tag}_x0.gif")
        caption = "rows: " + ", ".join(model.class_names) if k and model.class_names else "unconditional"
        log_image(trainer.loggers, "samples/grid", image, trainer.global_step, caption, gif)
        return path


class SampleQuality(_ValidationSampler):
    """Every ``every_n_epochs`` validation epochs (and the last), FD/KID/accuracy of n samples scored as evaluate.py
    scores them, logged as val/fd, val/kid, val/cond_acc (class-balanced), val/cond_acc/<class>, ...
    (ModelCheckpoint can monitor val/fd). Under DDP every rank samples its share and the metric states are
    gathered, so every rank takes part. ``metrics``: the settings of conf/metrics/ (feature, classifier_ckpt, ...).
    """

    def __init__(self, sampling: SamplingSpec, metrics: dict[str, Any] | None = None, every_n_epochs: int = 10, n: int = 256) -> None:
        super().__init__(sampling, every_n_epochs)
        self.n = n
        self.metrics_cfg = MetricsConfig.from_mapping(metrics)
        self.context: MetricsContext | None = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # the same decision on every rank: all of them sample, or none
        if not self.due(trainer, batch_idx, dataloader_idx):
            return
        for key, value in self.evaluate(trainer, pl_module).items():
            if not key.startswith("_"):
                pl_module.log(f"val/{key}", value, on_step=False, on_epoch=True, batch_size=1, sync_dist=False)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        model = pl_module.model
        k = model.num_classes
        if self.context is None:  # built on first use: the classifier and real features cost nothing until then
            identity = model.data or trainer.datamodule.identity()
            self.context = MetricsContext(self.metrics_cfg, trainer.datamodule, identity, conditional=k > 0, device=pl_module.device)
        plan = self.spec.bind(model, trainer.datamodule.train_set.tensors[0])
        samples = eval_plan(self.n, self.spec, model, model.config.get("data") or {}, trainer.datamodule)
        values = score(plan, samples, self.context, trainer.global_rank, trainer.world_size)
        shown = {k: round(v, 4) for k, v in values.items() if isinstance(v, float) and "/" not in k}
        per_class = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in values.items() if k.startswith("cond_acc/"))
        log.info(f"epoch {trainer.current_epoch}: sample quality ({self.n} samples, EMA weights) {shown}"
                 + (f"; accuracy per class: {per_class}" if per_class else ""))
        return values

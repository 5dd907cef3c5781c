"""The LightningModule: wires a network, a noise schedule and the eps loss; optimizer; logging.

Batches arrive scaled to [-1, 1] (see data/datamodule.py). Validation runs on the EMA weights when the
WeightAveraging callback is on (it swaps them in for the whole validation epoch).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from difflab.diffusion import eps_loss, sample_timesteps
from difflab.schedules import NoiseSchedule


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: dict[str, Any] | None = None,
        p_uncond: float = 0.1,
        class_names: Sequence[str] = (),
        channels_last: bool = False,
        compile: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.lr_scheduler_cfg = dict(lr_scheduler) if lr_scheduler else None
        self.p_uncond = p_uncond
        self.class_names = list(class_names)
        self.channels_last = channels_last
        self.compile = compile
        self.run_config = run_config  # the resolved run config, saved in checkpoints to rebuild net + schedule
        self.conditional = getattr(net, "num_classes", 0) > 0
        self.val_loss = MeanMetric()
        self.val_loss_quartile = nn.ModuleList(MeanMetric() for _ in range(4))
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._compiled_forward: Callable[..., Tensor] | None = None  # a function, so not a registered submodule

    def setup(self, stage: str) -> None:
        # compiled here, after callbacks (EMA) have copied the plain module in their own setup
        if self.compile and stage == "fit":
            self._compiled_forward = torch.compile(self.net.forward)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_keep: Tensor | None = None) -> Tensor:
        return self.net(x, t, context, context_keep)

    def _prepare(self, x0: Tensor) -> Tensor:
        return x0.contiguous(memory_format=torch.channels_last) if self.channels_last else x0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, context = batch
        x0 = self._prepare(x0)
        b = x0.shape[0]
        t = sample_timesteps(b, self.schedule.timesteps, x0.device)
        noise = torch.randn_like(x0)
        net = self._compiled_forward or self.net
        if self.conditional:
            # context dropout: the null context trains the unconditional branch of guidance
            keep = torch.rand(b, device=x0.device) >= self.p_uncond
            loss = eps_loss(net, self.schedule, x0, t, noise, context=context, context_keep=keep)
        else:
            loss = eps_loss(net, self.schedule, x0, t, noise)
        loss = loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x0, context, noise, u = batch
        x0, noise = self._prepare(x0), self._prepare(noise)
        T = self.schedule.timesteps
        # fixed u in [0, 1) -> t = floor(u T): the same noise and timesteps every epoch and run
        t = (u * T).long().clamp(max=T - 1)
        loss = eps_loss(self.net, self.schedule, x0, t, noise, context=context if self.conditional else None)
        self.val_loss.update(loss)
        quartile = (t * 4) // T
        for q, metric in enumerate(self.val_loss_quartile):
            metric.update(loss, weight=(quartile == q).float())
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=x0.shape[0])
        for q, metric in enumerate(self.val_loss_quartile):
            self.log(f"val/loss_t_q{q + 1}", metric, batch_size=x0.shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if not self.lr_scheduler_cfg:
            return optimizer
        cfg = dict(self.lr_scheduler_cfg)
        factory = cfg.pop("scheduler")
        kwargs = {}
        if "total_steps" in inspect.signature(factory).parameters:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": factory(optimizer=optimizer, **kwargs), **cfg}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["difflab_config"] = self.run_config
        checkpoint["class_names"] = self.class_names

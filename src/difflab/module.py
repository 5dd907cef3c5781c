"""The LightningModule: trains a DiffusionModel (network + schedule + objective); optimizer; logging.

Batches arrive scaled to [-1, 1] (see data/datamodule.py). Validation runs on the EMA weights when the
WeightAveraging callback is on (it swaps them in for the whole validation epoch).

The loss and gradient norm are checked for nan/inf on the device, with no host synchronisation per step: the first
non-finite one is recorded there and read at the logging interval, at the end of every epoch and before every
checkpoint is written, which stops the run (NonFiniteLossError) so that no checkpoint ever holds weights from that step
on. Each step's randomness is seeded by the DataModule (see rng.py).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from difflab.errors import NonFiniteLossError
from difflab.masks import known_pixels, training_masks
from difflab.model import DiffusionModel
from difflab.optim import check_optimizer


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        model: DiffusionModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: dict[str, Any] | None = None,
        p_uncond: float = 0.1,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = model  # what the training-time callbacks sample; its config and data identity go into checkpoints
        # its network and schedule are this module's children too: checkpoints keep the keys net.* (EMA swaps weights in place)
        self.net, self.schedule = model.net, model.schedule
        self.optimizer_factory = check_optimizer(optimizer)
        self.lr_scheduler_cfg = dict(lr_scheduler) if lr_scheduler else None
        self.p_uncond = p_uncond
        self.channels_last = channels_last
        self.compile = compile
        self.conditional = model.num_classes > 0
        self.val_loss = MeanMetric()
        self.val_loss_quartile = nn.ModuleList(MeanMetric() for _ in range(4))
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._compiled_forward: Callable[..., Tensor] | None = None  # a function, so not a registered submodule
        # the first non-finite value seen: [step, epoch, what (0: train/loss, 1: the gradient norm), value]; step -1: none
        self.register_buffer("first_nonfinite", torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=torch.float64), persistent=False)

    def setup(self, stage: str) -> None:
        # compiled here, after callbacks (EMA) have copied the plain module in their own setup
        if self.compile and stage == "fit":
            self._compiled_forward = torch.compile(self.net.forward)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_keep: Tensor | None = None) -> Tensor:
        return self.net(x, t, context, context_keep)

    def _prepare(self, x0: Tensor) -> Tensor:
        return x0.contiguous(memory_format=torch.channels_last) if self.channels_last else x0

    def step_loss(self, x0: Tensor, context: Tensor) -> Tensor:
        """Per-sample training loss (B,) of a batch."""
        b = x0.shape[0]
        objective = self.model.objective
        t = objective.sample_t(self.schedule, b, x0.device)
        noise = torch.randn_like(x0)
        net = self._compiled_forward or self.net
        images = self.known_pixels(x0)
        if self.conditional:
            # context dropout: the null context trains the unconditional branch of guidance
            keep = torch.rand(b, device=x0.device) >= self.p_uncond
            return objective.loss(net, self.schedule, x0, t, noise, context=context, context_keep=keep, **images)
        return objective.loss(net, self.schedule, x0, t, noise, **images)

    def known_pixels(self, x0: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """An inpainting model's input beside x_t for a batch: x0 under random masks (difflab.masks.TRAINING_MIX); {} for
        any other model."""
        if not self.model.inpainting:
            return {}
        fill = training_masks(x0.shape[0], x0.shape[-1], generator).to(x0.device)
        return {"cond": known_pixels(x0, fill)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, context = batch
        x0 = self._prepare(x0)
        b = x0.shape[0]
        loss = self.step_loss(x0, context).mean()
        # (under DDP a rank's non-finite loss reaches every rank as a non-finite gradient norm, noted below)
        self.note_nonfinite(loss, 0)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def note_nonfinite(self, value: Tensor, what: int) -> None:
        """Records ``value`` (a 0-d tensor) if it is the first non-finite one, on its device: no host sync."""
        first = self.first_nonfinite
        record = torch.tensor([self.trainer.global_step, self.trainer.current_epoch, what], dtype=first.dtype, device=first.device)
        record = torch.cat([record, value.detach().to(first).reshape(1)])
        first.copy_(torch.where(~torch.isfinite(value.detach()) & (first[0] < 0), record, first))

    def check_finite(self) -> None:
        """One host sync: NonFiniteLossError if a non-finite loss or gradient norm was recorded."""
        step, epoch, what, value = self.first_nonfinite.tolist()
        if step >= 0:
            raise self._diverged(("train/loss", "the gradient norm")[int(what)], value, int(step), int(epoch))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:  # when Lightning syncs to log anyway
            self.check_finite()

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        # a grad scaler (16-mixed) skips steps with inf gradients by design; otherwise the step writes nan weights, and
        # the run stops at the next check, before any checkpoint holds them
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            self.note_nonfinite(norm, 1)
        self.log("train/grad_norm", norm, batch_size=1)
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def _diverged(self, what: str, value: float, step: int, epoch: int) -> NonFiniteLossError:
        trainer = self.trainer
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        return NonFiniteLossError(
            f"{what} is {value} at step {step} (epoch {epoch}): training stopped at step {trainer.global_step}, before any "
            f"checkpoint held weights from step {step} on, so the saved checkpoints keep finite weights. Likely fixes: a lower learning rate "
            f"(optim.optimizer.lr, now {lr:g}), gradient clipping (trainer.gradient_clip_val=1.0, now {trainer.gradient_clip_val}), "
            f"trainer.precision=32 (now {trainer.precision}); or check the data for nan values"
        )

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x0, context, noise, u = batch
        x0, noise = self._prepare(x0), self._prepare(noise)
        # fixed u in [0, 1) -> t, increasing in u (a T-step schedule: step floor(u T)): the same noise and levels every
        # epoch and run
        t = self.schedule.from_unit(u)
        # an inpainting model: the same masks every epoch and run, as the noise
        images = self.known_pixels(x0, torch.Generator().manual_seed(batch_idx))
        loss = self.model.objective.loss(self.net, self.schedule, x0, t, noise, context=context if self.conditional else None, **images)
        self.val_loss.update(loss)
        quartile = (u * 4).long().clamp(max=3)
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
            total = self.trainer.estimated_stepping_batches
            # no step or epoch limit (max_time only): a placeholder that difflab.budget.TimeBudget replaces
            kwargs["total_steps"] = int(total) if math.isfinite(total) else 10**9
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": factory(optimizer=optimizer, **kwargs), **cfg}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # before the file is written: no checkpoint holds weights from a non-finite step on
        checkpoint["difflab_config"] = self.model.config
        checkpoint["class_names"] = self.model.class_names
        checkpoint["difflab_data"] = self.model.data

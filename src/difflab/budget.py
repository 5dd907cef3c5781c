"""A run that ends well inside ``trainer.max_time``: the LR schedule (and the last step) fitted to the time budget.

Lightning's max_time alone cuts a run wherever the clock runs out, mid-schedule (the learning rate still high, the
EMA weights far from a decayed model). TimeBudget measures the seconds per step so far (validation, sample grids and
other callbacks included, as they count against max_time) after ``measure_steps`` steps, and again half way to the
estimated end each time (until under 20 steps or two epochs remain), and sets the trainer's max_steps and the schedule's
total_steps to the end of the last whole epoch that fits in ``margin`` of the remaining time: the run reaches the end
of its schedule just before the budget, and ends with a validation epoch (and sample grid). Both values travel in
checkpoints; a resumed run keeps them, then measures its own speed again after ``measure_steps`` steps (another
machine, another thread count, or a new ``trainer.max_time`` fits the rest of the schedule into what is left; a run
that had reached its fitted end and is resumed with a larger ``trainer.max_time`` goes on and fits a new end).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

from difflab.optim import WarmupDecay

log = logging.getLogger(__name__)


class TimeBudget(L.Callback):
    def __init__(self, measure_steps: int = 60, margin: float = 0.95) -> None:
        self.measure_steps = measure_steps
        self.margin = margin
        self.total_steps: int | None = None
        self.recheck_at: int | None = None
        self.start: tuple[int, float] = (0, 0.0)  # (step, seconds of training) when this process began training

    @staticmethod
    def timer(trainer: L.Trainer) -> Timer | None:
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        return timer if timer is not None and timer.time_remaining("train") is not None else None  # None: no max_time

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer, step = self.timer(trainer), trainer.global_step
        self.start = (step, timer.time_elapsed("train") if timer is not None else 0.0)
        if self.total_steps is not None and step >= self.total_steps and timer is not None and step > 0 and \
                timer.time_remaining("train") / (self.start[1] / step) >= self.measure_steps:
            # a finished run resumed with a larger trainer.max_time: room for more steps at its earlier speed, so the
            # old end is dropped and the rest fitted after measure_steps steps here
            self.total_steps, self.recheck_at = None, step + self.measure_steps
            log.info(f"time budget: {timer.time_remaining('train') / 60:.1f} min of trainer.max_time left after the end fitted before: fitting a new end")
        elif self.total_steps is not None:  # resumed: the budget fitted before the interruption, until measured again here
            self.apply(trainer, self.total_steps)
            if step + self.measure_steps < self.total_steps:
                self.recheck_at = step + self.measure_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        timer, step = self.timer(trainer), trainer.global_step
        if timer is None or step not in (self.measure_steps, self.recheck_at) or step <= self.start[0]:
            return
        # this process's own speed: a resumed run may run on another machine or with other threads
        seconds_per_step = (timer.time_elapsed("train") - self.start[1]) / (step - self.start[0])
        total = step + max(int(timer.time_remaining("train") * self.margin / seconds_per_step), 1)
        # the end of the last whole epoch that fits: the run ends with its validation and sample grid (unless the
        # budget ends inside the current epoch)
        per_epoch = int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 0
        if per_epoch and total // per_epoch * per_epoch > step:
            total = total // per_epoch * per_epoch
        # re-checked half way to the end each time (a shared machine's speed drifts), until under 20 steps or two epochs
        # remain: a late re-check that found a few seconds more would move the end past an epoch boundary, and the
        # next one, after that epoch's validation, back inside the epoch
        self.recheck_at = step + (total - step) // 2 if total - step >= max(20, 2 * per_epoch) else None
        self.apply(trainer, total)
        log.info(f"time budget: {seconds_per_step:.3f} s/step so far, so the run ends at step {total} "
                 f"(the LR schedule's last step; {timer.time_remaining('train') / 60:.1f} min left)")

    def apply(self, trainer: L.Trainer, total: int) -> None:
        self.total_steps = total
        trainer.fit_loop.epoch_loop.max_steps = total
        for config in trainer.lr_scheduler_configs:
            for fn in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(fn, WarmupDecay):
                    fn.total_steps = total

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "recheck_at": self.recheck_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps, self.recheck_at = state_dict.get("total_steps"), state_dict.get("recheck_at")


class RunClock(L.Callback):
    """The run's own clock: seconds of training (validation, grids and callbacks included, as a time budget counts them)
    and images seen (all ranks), carried across resumes in checkpoints; logged as trainer/seconds and
    trainer/images_seen with every validation, so runs on other machines or batch sizes compare at equal budget."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._since: float | None = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._since is not None:
            self.seconds += now - self._since
        self._since = now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += len(batch[0]) * trainer.world_size
        self._tick()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._tick()
        pl_module.log("trainer/seconds", self.seconds, batch_size=1, sync_dist=False)
        pl_module.log("trainer/images_seen", float(self.images), batch_size=1, sync_dist=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tick()

    def state_dict(self) -> dict[str, Any]:
        self._tick()
        return {"seconds": self.seconds, "images": self.images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds, self.images = state_dict.get("seconds", 0.0), state_dict.get("images", 0)

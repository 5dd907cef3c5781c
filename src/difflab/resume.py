"""Continuing interrupted runs: random states in checkpoints, signals that stop at a step boundary with a
checkpoint of that step, and ``ckpt_path=auto`` (this run folder's own newest checkpoint, if any).

A signal never interrupts a step: the handler only notes it, and training stops after the current batch
(and its EMA update), so the checkpoint written then resumes exactly like one written by ModelCheckpoint.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from difflab.cli import Stopped
from difflab.rng import collect_states, restore_states

log = logging.getLogger(__name__)


class RandomStates(L.Callback):
    """Every rank's Python / NumPy / torch / CUDA generator states in each checkpoint, restored when training resumes."""

    def __init__(self) -> None:
        self.loaded: list[dict[str, Any]] | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        states = collect_states()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)  # checkpoints are saved on every rank (collectively)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict.get("ranks")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in load_state_dict: nothing between this hook and the first batch draws random numbers
        if self.loaded is not None:
            if len(self.loaded) == trainer.world_size:
                restore_states(self.loaded[trainer.global_rank])
            else:
                log.warning(f"the checkpoint has random states of {len(self.loaded)} ranks, this run has {trainer.world_size}: "
                            "each step is still seeded from (seed, rank, step), only code between steps draws differently")
            self.loaded = None


def _submitit_signal() -> signal.Signals | None:
    """The signal submitit sends before a timeout or preemption (it then requeues the job), when running under it."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"), None)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class Preemption(L.Callback):
    """SIGTERM / SIGINT: finish the current batch, save checkpoints/last.ckpt at that step, exit 143 / 130.

    Under submitit its requeue signal (USR2) does the same and then hands over to submitit, which requeues
    the job; the requeued job finds the checkpoint with ckpt_path=auto. Must run after the EMA callback
    (train.py puts it last), so the saved step includes its EMA update.
    """

    def __init__(self) -> None:
        self.received: int = 0
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        if not self.received:
            log.warning(f"received {signal.Signals(signum).name}: stopping after this batch (under DDP: at the next logging "
                        "step), with a checkpoint")
        self.received = self.received or signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own SIGTERM handler (it would stop mid-validation, with the EMA weights swapped in)
        signals = [signal.SIGTERM, signal.SIGINT] + ([s] if (s := _submitit_signal()) else [])
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._note)
            except ValueError:  # not the main thread: leave signals to whoever owns them
                pass

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _agreed_signal(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        received = self.received or (signal.SIGTERM if trainer.received_sigterm else 0)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # one rank's signal stops them all at the same step (a kill often reaches rank 0 only)
            flag = torch.tensor([received], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        return received

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # under DDP the ranks agree by an all-reduce (a host sync): at the logging interval only, not every step
        if trainer.world_size == 1 or trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._stop_if_signalled(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a signal during validation or the sample grids: stop at the end of the epoch
        self._stop_if_signalled(trainer, pl_module)

    def _stop_if_signalled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self._agreed_signal(trainer, pl_module)
        if not signum:
            return
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        run_dir = Path(trainer.default_root_dir)
        message = (f"stopped by {name} at step {trainer.global_step} (epoch {trainer.current_epoch}); saved {path}. "
                   f"Resume: python train.py {resume_command(run_dir)} (ckpt_path=auto, the default, continues it) "
                   f"or ckpt_path={run_dir}")
        previous = self._previous.get(signum)
        self._restore_handlers()
        if signum == _submitit_signal() and callable(previous):
            previous(signum, None)  # submitit: requeue this job (rank 0 exits here), then it resumes with ckpt_path=auto
        raise Stopped(signum, message)


def resume_command(run_dir: Path) -> str:
    """The overrides that continue this run: the ones it was started with (an experiment's settings are not in the run
    folder's checkpoint alone) and its folder."""
    from hydra.core.hydra_config import HydraConfig

    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in task if not o.lstrip("+~").startswith(("hydra.run.dir=", "ckpt_path="))]
    return " ".join(shlex.quote(o) for o in [*kept, f"hydra.run.dir={run_dir}"])


class FinalCheckpoint(L.Callback):
    """When training ends, checkpoints/last.ckpt holds the final step. ModelCheckpoint does not always write it:
    with every_n_train_steps it skips the steps after the last multiple, and defers saves it cannot rank yet."""

    def __init__(self) -> None:
        self.saved_step = -1  # the step of the newest checkpoint this process wrote

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or self.saved_step != trainer.global_step or not callback.last_model_path:
            trainer.save_checkpoint(checkpoint_dir(trainer) / "last.ckpt")


def own_checkpoint(run_dir: str | Path) -> Path | None:
    """ckpt_path=auto: the newest of this run folder's checkpoints/last.ckpt and Lightning's SLURM hpc_ckpt_*.ckpt."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints" / "last.ckpt",) if p.is_file()] + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None

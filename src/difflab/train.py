"""Training: compose -> seed -> instantiate -> fit. ``train.py`` at the repo root calls ``train``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, open_dict

from difflab.budget import RunClock, TimeBudget
from difflab.checkpoint import check_compatible, load_checkpoint, net_state_dict, resolve_checkpoint, with_cond_inputs
from difflab.config import configuration_label, hydra_choice, instantiate_group, to_container, use_tf32
from difflab.ddp import use_job_command_for_ddp_ranks
from difflab.errors import ConfigError
from difflab.loggers import finish_wandb, quiet_duplicate_logs, start_loggers, use_wandb_offline_without_key
from difflab.model import build_model
from difflab.results import score_row, write_final
from difflab.resume import FinalCheckpoint, Preemption, RandomStates, checkpoint_dir, own_checkpoint
from difflab.scoring import FinalEval, save_scores
from difflab.validate import check_trainer_config, integer

log = logging.getLogger(__name__)


def prediction_target(objective: dict | None) -> str | None:
    """The class whose output the network learns (a consistency objective's parametrisation; weightings aside)."""
    objective = objective or {}
    return (objective.get("prediction") or objective).get("_target_")


def end_distributed(env_before_fit: dict[str, str]) -> None:
    """Lightning leaves the DDP process group and its launch variables (MASTER_PORT, LOCAL_RANK, ...)
    behind; the next job of a sweep in this process must start its own ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env_before_fit)


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule (conf/module/) training a fresh DiffusionModel built from the run config."""
    return instantiate(
        cfg.module,
        model=build_model(to_container(cfg)),
        optimizer=instantiate(cfg.optim.optimizer),
        lr_scheduler=instantiate(cfg.optim.lr_scheduler, _convert_="all"),
    )


def take_model_from_init(cfg: DictConfig) -> None:
    """A fine-tune of any model (model_from_init: true): the network, schedule and objective of init_from's run, not the
    experiment's defaults, so `init_from=<run>` alone is enough whatever width or objective that run trained."""
    saved = load_checkpoint(resolve_checkpoint(cfg.init_from, Path(cfg.paths.log_dir)))["difflab_config"]
    with open_dict(cfg):
        for key in ("model", "schedule", "objective", "timesteps"):
            if key in saved:
                cfg[key] = saved[key]
    log.info(f"fine-tuning init_from's own model: {cfg.model._target_} (base_channels {cfg.model.get('base_channels')}), "
             f"{cfg.schedule._target_}, {cfg.objective._target_}")


def checkpoint_to_resume(cfg: DictConfig) -> Path | None:
    """ckpt_path: auto (this run folder's own checkpoint if it has one, else a fresh start), null (a fresh start,
    refused where it would overwrite checkpoints), a .ckpt file, a run folder, or last (the newest run)."""
    spec = cfg.get("ckpt_path")
    run_dir = Path(cfg.paths.output_dir)
    own = own_checkpoint(run_dir)
    if spec == "auto":
        return own
    if spec is None:
        if own is not None:
            raise ConfigError(f"ckpt_path=null but the run folder {run_dir} already holds {own}: training would overwrite it. "
                              "Continue it with ckpt_path=auto, or start in a new folder (drop hydra.run.dir)")
        return None
    return resolve_checkpoint(spec, Path(cfg.paths.log_dir) / cfg.task_name)


def finished(cfg: DictConfig) -> dict[str, float] | None:
    """The final figures of this run folder when it already finished this very config (its final.json): the same command
    again, e.g. a re-run -m sweep, skips the jobs that are done (and resumes the one that was cut, ckpt_path=auto)."""
    path = Path(cfg.paths.output_dir) / "final.json"
    if cfg.get("ckpt_path") != "auto" or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("config") != json.loads(json.dumps(to_container(cfg), default=str)):
        return None  # another config in this folder (e.g. more epochs): it continues from its checkpoint
    log.info(f"{path.parent} finished this config already ({path}): skipped")
    row, training = saved.get("row") or {}, saved.get("training") or {}
    found = {f"final/{k}": float(v) for k, v in row.items() if isinstance(v, float)}
    return {**found, **({"val/loss": float(training["val_loss"])} if training.get("val_loss") is not None else {})}


def global_batch_note(world_size: int, batch_size: int, lr: float | None) -> str | None:
    """What a multi-process run trains on, said once: each of its steps takes world_size x data.batch_size images."""
    if world_size <= 1:
        return None
    return (f"{world_size} processes x data.batch_size={batch_size} = {world_size * batch_size} images per step, {world_size}x a "
            f"single-process run of this config, with the same learning rate (optim.optimizer.lr={lr}) and steps/epochs. "
            f"For the single-process recipe's images per step use data.batch_size={max(batch_size // world_size, 1)}"
            + (f"; to keep the global batch and scale the learning rate linearly, optim.optimizer.lr={lr * world_size:g}" if lr else "")
            + "; trainer.max_steps (or max_epochs) counts these larger steps")


class DataIdentity(L.Callback):
    """The data set's identity (file hashes) into the model, and so into its checkpoints, once ``prepare_data`` has run:
    a first run on a fresh machine downloads CIFAR-10 there, and hashing earlier would find no files."""

    def __init__(self, choice: str | None) -> None:
        self.choice = choice

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.model.data = {**trainer.datamodule.identity(), "choice": self.choice}


def train(cfg: DictConfig) -> dict[str, Any]:
    use_tf32(cfg.get("tf32", True))
    quiet_duplicate_logs()
    check_trainer_config(cfg.trainer)
    if cfg.get("seed") is not None:
        integer("seed", cfg.seed, 0, " (or seed=null for a random one)")
    done = finished(cfg)
    if done is not None:
        return done
    use_job_command_for_ddp_ranks()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if "wandb" in (cfg.get("logger") or {}):
        use_wandb_offline_without_key()

    if cfg.get("require_init_from") and not cfg.get("init_from"):
        raise ConfigError("this experiment fine-tunes a trained model: add init_from=<checkpoint file | run dir | last>")
    if cfg.get("model_from_init") and cfg.get("init_from"):
        take_model_from_init(cfg)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info(f"model {cfg.model._target_}: {n_params / 1e6:.2f}M parameters; schedule {module.schedule}; {module.model.objective}")

    ckpt_path = checkpoint_to_resume(cfg)
    if ckpt_path is not None:
        check_compatible(module, load_checkpoint(ckpt_path)["state_dict"], f"checkpoint {ckpt_path}")
        log.info(f"resuming from {ckpt_path}")
    elif cfg.get("init_from"):
        init = resolve_checkpoint(cfg.init_from, Path(cfg.paths.log_dir))
        saved = load_checkpoint(init)
        weights = with_cond_inputs(module.net, net_state_dict(saved, ema=True))
        check_compatible(module.net, weights, f"init_from checkpoint {init}")
        module.net.load_state_dict(weights)
        log.info(f"fine-tuning from the EMA weights of {init}")
        before, now = prediction_target(saved["difflab_config"].get("objective")), prediction_target(module.model.config.get("objective"))
        if before != now:
            log.warning(f"init_from: {init} was trained to predict with {before}, this run trains {now}: the network starts "
                        "from another prediction target")

    # checked now, not after the training; final_eval=none leaves no _target_ (debug=fast may still set its n)
    final_eval = instantiate(cfg.final_eval) if "_target_" in (cfg.get("final_eval") or {}) else None
    # always on, and after the configured ones: a signal's checkpoint must include this step's EMA update
    clock = RunClock()
    callbacks = [DataIdentity(hydra_choice("data")), *instantiate_group(cfg.get("callbacks")), TimeBudget(), clock, RandomStates(),
                 Preemption(), FinalCheckpoint()]
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: Lightning's LearningRateMonitor refuses a trainer without one (it has nowhere to write)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    note = global_batch_note(trainer.world_size, cfg.data.batch_size, cfg.optim.optimizer.get("lr"))
    if note:
        rank_zero_warn(note)
    start_loggers(loggers, to_container(cfg), configuration_label(cfg))

    env = dict(os.environ)
    out = Path(cfg.paths.output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if trainer.is_global_zero:
            metrics.update(finish(final_eval, trainer, datamodule, clock, metrics, cfg, loggers))
    finally:
        finish_wandb(loggers)
        end_distributed(env)

    if trainer.is_global_zero:
        print(f"\nRun folder: {out}")
        if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "last_model_path", ""):
            print(f"  checkpoints: {Path(trainer.checkpoint_callback.dirpath)}  (last: {trainer.checkpoint_callback.last_model_path})")
        if (out / "samples").is_dir():
            print(f"  sample grids: {out / 'samples'}")
        for logger in loggers:
            print(f"  {type(logger).__name__}: {logger.log_dir if hasattr(logger, 'log_dir') and logger.log_dir else logger.save_dir}")
        shown = {k: round(v, 5) for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
        print(f"  final metrics: {shown}")
        quality = {k.removeprefix("final/"): round(v, 4) for k, v in metrics.items() if k.startswith("final/") and "/" not in k[6:]}
        if quality:
            print(f"  final quality ({cfg.final_eval.n} samples): {quality}")
        print(f"  summary: {out / 'final.json'}")
    return metrics


def finish(final_eval: FinalEval | None, trainer: L.Trainer, datamodule: Any, clock: RunClock, metrics: dict[str, float],
           cfg: DictConfig, loggers: list) -> dict[str, float]:
    """How the run ended, into <run>/final.json and the loggers: steps, time, images seen, val/loss and, with final_eval,
    the final EMA weights (the run's last checkpoint) scored as evaluate.py scores them (per sample: scores.npz);
    -> the final figures as final/<name>."""
    out = Path(cfg.paths.output_dir)
    training = {"train_steps": trainer.global_step, "train_seconds": round(clock.seconds, 2), "images_seen": clock.images,
                "val_loss": metrics.get("val/loss")}
    scored = final_eval(checkpoint_dir(trainer) / "last.ckpt", datamodule, trainer.strategy.root_device) if final_eval else None
    row = None
    if scored is not None:
        row = score_row(scored.plan, final_eval.n, final_eval.metrics_cfg.feature, scored.values, scored.seconds,
                        scorer=scored.context.scorer)
        save_scores(out / "scores.npz", scored.samples, scored.context)
    write_final(out, training, row, scored.values if scored else {}, cfg, loggers)
    return {f"final/{k}": float(v) for k, v in (scored.values if scored else {}).items() if isinstance(v, float)}

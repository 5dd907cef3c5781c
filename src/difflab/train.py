"""Training: compose -> seed -> instantiate -> fit. ``train.py`` at the repo root calls ``train``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from difflab.budget import TimeBudget
from difflab.checkpoint import check_compatible, load_checkpoint, net_state_dict, resolve_checkpoint
from difflab.config import hydra_choice, instantiate_group, to_container
from difflab.ddp import use_job_command_for_ddp_ranks
from difflab.errors import ConfigError
from difflab.loggers import finish_wandb, quiet_duplicate_logs, use_wandb_offline_without_key
from difflab.model import build_model
from difflab.resume import FinalCheckpoint, Preemption, RandomStates, own_checkpoint
from difflab.validate import check_trainer_config, integer

log = logging.getLogger(__name__)


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


def train(cfg: DictConfig) -> dict[str, Any]:
    quiet_duplicate_logs()
    check_trainer_config(cfg.trainer)
    if cfg.get("seed") is not None:
        integer("seed", cfg.seed, 0, " (or seed=null for a random one)")
    use_job_command_for_ddp_ranks()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if "wandb" in (cfg.get("logger") or {}):
        use_wandb_offline_without_key()

    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    module.model.data = {**datamodule.identity(), "choice": hydra_choice("data")}
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info(f"model {cfg.model._target_}: {n_params / 1e6:.2f}M parameters; schedule {module.schedule}; {module.model.objective}")

    if cfg.get("require_init_from") and not cfg.get("init_from"):
        raise ConfigError("this experiment fine-tunes a trained model: add init_from=<checkpoint file | run dir | last>")
    ckpt_path = checkpoint_to_resume(cfg)
    if ckpt_path is not None:
        check_compatible(module, load_checkpoint(ckpt_path)["state_dict"], f"checkpoint {ckpt_path}")
        log.info(f"resuming from {ckpt_path}")
    elif cfg.get("init_from"):
        init = resolve_checkpoint(cfg.init_from, Path(cfg.paths.log_dir))
        saved = load_checkpoint(init)
        weights = net_state_dict(saved, ema=True)
        check_compatible(module.net, weights, f"init_from checkpoint {init}")
        module.net.load_state_dict(weights)
        log.info(f"fine-tuning from the EMA weights of {init}")
        if saved["difflab_config"].get("objective") != module.model.config.get("objective"):
            log.warning(f"init_from: {init} was trained with objective {saved['difflab_config'].get('objective')}, this run trains "
                        f"{module.model.config.get('objective')}: the network starts from another prediction target")

    # always on, and after the configured ones: a signal's checkpoint must include this step's EMA update
    callbacks = [*instantiate_group(cfg.get("callbacks")), TimeBudget(), RandomStates(), Preemption(), FinalCheckpoint()]
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: Lightning's LearningRateMonitor refuses a trainer without one (it has nowhere to write)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(to_container(cfg))

    env = dict(os.environ)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(loggers)
        end_distributed(env)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        print(f"\nRun folder: {out}")
        if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "last_model_path", ""):
            print(f"  checkpoints: {Path(trainer.checkpoint_callback.dirpath)}  (last: {trainer.checkpoint_callback.last_model_path})")
        if (out / "samples").is_dir():
            print(f"  sample grids: {out / 'samples'}")
        for logger in loggers:
            print(f"  {type(logger).__name__}: {logger.log_dir if hasattr(logger, 'log_dir') and logger.log_dir else logger.save_dir}")
        shown = {k: round(v, 5) for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
        print(f"  final metrics: {shown}")
    return metrics

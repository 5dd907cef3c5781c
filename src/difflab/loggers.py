"""What every entry point does with Lightning's loggers: W&B offline without a key, one console handler,
images to whichever loggers take them (W&B, TensorBoard), closing W&B between the jobs of a sweep."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


def use_wandb_offline_without_key() -> None:
    """W&B goes offline (never blocks on a login prompt or the network) unless a key is configured."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    log.info("W&B: no API key found, logging offline (sync later with `wandb sync <run>/wandb/offline-run-*`)")


# each quality figure's direction: the W&B runs table summarises val/, final/ and eval/ figures by their best value
DIRECTIONS = {"fd": "min", "kid": "min", "memorized": "min", "cond_acc": "max"}


def start_loggers(loggers: Sequence[Any], config: dict[str, Any], configuration: str | None) -> None:
    """The run's config, with ``configuration`` (the report's name for its settings: W&B groups a configuration's seeds
    by it), to every logger; on W&B, the direction of each quality figure."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        logger.log_hyperparams({**config, "configuration": configuration})
        if isinstance(logger, WandbLogger):
            for prefix in ("val", "final", "eval"):
                for name, best in DIRECTIONS.items():
                    logger.experiment.define_metric(f"{prefix}/{name}", summary=best)


def finish_wandb(loggers: Sequence[Any]) -> None:
    """Close the W&B run: otherwise the next job of a -m sweep (same process) would log into it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def quiet_duplicate_logs() -> None:
    """Lightning adds its own console handler; under Hydra the root logger already prints (and files) it."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def log_image(loggers: Sequence[Any], key: str, image: np.ndarray, step: int, caption: str = "", gif: Path | None = None) -> None:
    """An (H, W, 3) uint8 image (and optionally its chain as a GIF) to every logger that shows images."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_image(key, [image], step=step, caption=[caption])
            if gif is not None:
                logger.experiment.log({key.replace("grid", "chain"): wandb.Video(str(gif), format="gif"), "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
            if caption:
                logger.experiment.add_text(f"{key}/caption", caption, step)

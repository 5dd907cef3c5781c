"""Shared test helpers: composing configs and running the entry points as a user would."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from difflab.config import PROJECT_ROOT

CONF = str(PROJECT_ROOT / "conf")


def compose_cfg(overrides: list[str], output_dir: Path | str, config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(Path(output_dir) / "logs")
    return cfg


def run_script(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """python <script> <args> from the repo root, as a user types it; output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


class StopAfterEpoch(L.Callback):
    """Stops training after epoch ``epoch`` (0-based): an interrupted run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of every csv/version_N/metrics.csv of a run (a resumed run has several), in version order."""
    rows = []
    for path in sorted((Path(run_dir) / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows

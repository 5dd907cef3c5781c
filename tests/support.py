"""Shared test helpers: composing configs and running the entry points as a user would."""

from __future__ import annotations

import csv
import os
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from difflab.config import PROJECT_ROOT
from difflab.tolerance import U32, reorder_tol  # noqa: F401  (the tests' tolerances)

CONF = str(PROJECT_ROOT / "conf")


def compose_cfg(overrides: list[str], output_dir: Path | str, config_name: str = "train") -> DictConfig:
    """The config an entry point gets; training runs skip the final scores unless a final_eval override asks for them."""
    if config_name == "train" and not any(o.lstrip("~+").startswith("final_eval") for o in overrides):
        overrides = ["final_eval=none", *overrides]
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


class Crash(Exception):
    pass


class CrashAtStep(L.Callback):
    """Raises before the batch after ``step`` optimizer steps: a run killed right after its step-``step`` checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise Crash(f"killed at step {trainer.global_step}")


class RecordDraws(L.Callback):
    """Appends "<step> <python draw> <numpy draw>" to <run>/draws.txt at every batch start (the RNG states' restore)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        import random

        import numpy as np

        with open(Path(trainer.default_root_dir) / "draws.txt", "a") as f:
            f.write(f"{trainer.global_step} {random.random()!r} {np.random.rand()!r}\n")


class PoisonBatchAt(L.Callback):
    """Replaces the images of the batch at ``step`` by nan: a step that diverges."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def run_in_process(script: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(PROJECT_ROOT / script), run_name="__main__")
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def check_one_line(code: int, out: str, err: str, expected: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in out + err


def straight_and_cut(overrides: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """A run of trainer.max_epochs epochs, and the same run cut after its first epoch and resumed (ckpt_path=auto):
    their last checkpoints, in runs "straight" and "cut" under tmp_path."""
    from difflab.checkpoint import load_checkpoint
    from difflab.train import train

    train(compose_cfg(overrides, tmp_path / "straight"))
    train(compose_cfg([*overrides, "trainer.max_epochs=1"], tmp_path / "cut"))
    train(compose_cfg(overrides, tmp_path / "cut"))  # ckpt_path=auto: continues the cut run
    return tuple(load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "cut"))


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (run-*.wandb), as wandb's protobuf Records. The file is a LevelDB-style log:
    a 7-byte file header, then 32 KiB blocks of chunks, each behind a 7-byte header crc32c(4) length(2) type(1) with
    type FULL=1, FIRST=2, MIDDLE=3, LAST=4 (a block's last < 7 bytes are padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, pos, block = Path(path).read_bytes(), [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_config_and_metrics(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """An offline run's config (key -> JSON value) and its defined metrics (name -> summary: min / max / ...)."""
    config, metrics = {}, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            config.update({u.key: u.value_json for u in (r.run.config if kind == "run" else r.config).update})
        elif kind == "metric" and r.metric.name:
            metrics[r.metric.name] = next((k for k in ("min", "max", "mean", "last") if getattr(r.metric.summary, k)), "")
    return config, metrics

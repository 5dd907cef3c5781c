"""What scoring found, written down: evaluate.py's result.json / results.csv (with the key of everything that decides
them, reuse of an equal earlier job of the same sweep, the printed table, the loggers and the sweep's table,
metrics/summary.py), and how a training run ended (final.json: its steps, time, images seen, final val/loss and final
quality; its loggers' summaries). Both kinds of row have the same columns, from ``score_row``."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from difflab.config import to_container
from difflab.loggers import finish_wandb
from difflab.metrics.summary import fmt, write_summary
from difflab.sampling import SamplingPlan

RESULT_METRICS = ("fd", "kid", "kid_std", "cond_acc", "cond_acc_weighted", "colors_median", "top16_share", "top16_share_min", "memorized")


def score_row(plan: SamplingPlan, n: int, feature: str, values: Mapping[str, Any], seconds: float, world_size: int = 1,
              scorer: str | None = None) -> dict[str, Any]:
    """One row of scores: the sampling plan, the model's schedule and objective, the figures (no per-sample arrays), the
    time; ``scorer``: the scoring networks' identity (MetricsContext.scorer)."""
    model = plan.model
    return {
        **plan.row(), "n": n, "feature": feature, "scorer": scorer, "ckpt": str(model.source),
        "schedule": type(model.schedule).__name__.removesuffix("Schedule").lower(), "timesteps": model.schedule.timesteps,
        "objective": type(model.objective).__name__,
        **{k: v for k, v in values.items() if not k.startswith("_")},
        "seconds": round(seconds, 2), "images_per_second": round(n / max(seconds, 1e-9), 2), "world_size": world_size,
    }


def write_final(out_dir: Path, training: dict[str, Any], row: dict[str, Any] | None, figures: dict[str, Any], cfg: DictConfig,
                loggers: list) -> Path:
    """How a training run ended: final.json (its training figures, the final quality's row or None, the run config; a
    finished run's marker: the same command skips it) and every logger: CSV rows, the W&B run's summary, TensorBoard's
    HParams with the run's hyperparameters. ``figures``: the scores among the row's columns (what the loggers get)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    path = out_dir / "final.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"training": training, "row": row, "config": to_container(cfg), "output_dir": str(out_dir)},
                              indent=2, default=str))
    tmp.replace(path)
    numbers = {f"final/{k}": float(v) for k, v in {**figures, **training}.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(to_container(cfg), metrics=numbers)
        else:
            logger.log_metrics(numbers, step=training.get("train_steps"))
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(numbers)
        logger.save()
    return path


def run_key(settings: dict[str, Any]) -> str:
    """Equal settings (checkpoint, weights, sampling record, n, metrics, data) give equal results: a sweep reuses them."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    return None


def find_reusable(key: str, folder: Path | None, own: Path) -> dict[str, Any] | None:
    """The result.json of an earlier job under ``folder`` with this run key (not itself a reuse), if any."""
    if folder is None:
        return None
    for path in sorted(folder.rglob("result.json")):
        if path.parent.resolve() == own.resolve():
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("row", {}).get("run_key") == key and not result["row"].get("reused_from"):
            return result
    return None


def write_result(cfg: DictConfig, row: dict[str, Any], reference: dict[str, Any] | None, out_dir: Path, loggers: list) -> dict[str, Any]:
    """result.json (row, reference, config), results.csv (the row with the flattened config), the printed table, the
    loggers; in a -m sweep the sweep's table and plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_container(cfg)
    result = {"row": row, "reference": reference, "config": config, "output_dir": str(out_dir)}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    flat = dict(row)
    flat.update({f"ref/{k}": v for k, v in (reference or {}).items()})
    flat.update({f"config/{k}": v for k, v in _flatten(config).items() if not k.startswith(("paths", "hydra", "_"))})
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)
    print_result(row, reference, out_dir)
    log_to_loggers(loggers, row, reference)
    finish_wandb(loggers)
    folder = sweep_dir()
    if folder is not None:
        write_summary(folder)
    return row


def print_result(row: dict[str, Any], reference: dict[str, Any] | None, out_dir: Path) -> None:
    ref = reference or {}
    keys = [k for k in row if k in RESULT_METRICS or k.startswith(("cond_acc/", "nn_dist"))]
    print(f"\n{row['sampler']} ({row['steps']} steps), n={row['n']}, guidance={row['guidance']}, {row['feature']} features"
          + (f"  [reused from {row['reused_from']}]" if row.get("reused_from") else ""))
    print(f"  {'metric':24s} {'samples':>10s} {'real val':>10s}")
    for k in keys:
        print(f"  {k:24s} {fmt(row[k]):>10s} {fmt(ref.get(k)):>10s}")
    if row.get("images_per_second"):
        print(f"  {row['seconds']} s ({row['images_per_second']} img/s on {row['world_size']} rank(s))")
    if ref:
        print(f"  real val: the {ref.get('n')} held-out real images scored as if they were samples (the floor for FD/KID)")
    print(f"  written: {out_dir / 'result.json'}, {out_dir / 'results.csv'}")


def log_to_loggers(loggers: list, row: dict[str, Any], reference: dict[str, Any] | None) -> None:
    numbers = {f"eval/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.update({f"eval_ref/{k}": float(v) for k, v in (reference or {}).items() if isinstance(v, (int, float))})
    for logger in loggers:
        logger.log_metrics(numbers)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            columns = list(row)
            logger.experiment.log({"eval/result": wandb.Table(columns=columns, data=[[row[c] for c in columns]])})
        logger.save()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d) if isinstance(d, list) else d}

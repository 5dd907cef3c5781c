"""An evaluation's results: the key of everything that decides them, reuse of an equal earlier job of the same sweep,
and the files (result.json, results.csv), the printed table and the loggers; the sweep's table (metrics/summary.py)
is refreshed after each job."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from difflab.config import to_container
from difflab.loggers import finish_wandb
from difflab.metrics.summary import fmt, write_summary

RESULT_METRICS = ("fd", "kid", "kid_std", "cond_acc", "cond_acc_weighted", "colors_median", "top16_share", "top16_share_min", "memorized")


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

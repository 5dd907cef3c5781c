"""The table (CSV, Markdown) and quality-vs-steps plot of an evaluate.py sweep, from its jobs' result.json files."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from difflab.metrics.plot import line_chart

log = logging.getLogger(__name__)

# the columns of the sweep table, in order (per-class accuracies and nn-distance quantiles follow)
MAIN = ["sampler", "steps", "guidance", "n", "fd", "kid", "kid_std", "cond_acc", "cond_acc_weighted", "colors_median",
        "top16_share", "memorized", "images_per_second"]
SETTINGS = ("sampler", "guidance", "n", "seed", "ema", "feature", "ckpt", "schedule", "timesteps")  # what tells two lines of the plot apart
# shown in front of the Markdown table when they differ between rows (e.g. a sweep over checkpoints)
RUN_COLUMNS = ("ckpt", "schedule", "timesteps")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def collect(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.rglob("result.json"), key=_job_order):
        try:
            rows.append(json.loads(path.read_text())["row"])
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return rows


def _job_order(path: Path) -> tuple[float, str]:
    # job folders are named "<job number>_<overrides>": 2_... before 10_...
    match = re.match(r"\d+", path.parent.name)
    return (int(match.group()) if match else float("inf"), str(path))


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    extra = [k for r in rows for k in r if k not in MAIN]
    return [c for c in MAIN if any(c in r for r in rows)] + list(dict.fromkeys(extra))


def _varying(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The keys whose values differ between rows."""
    return [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1]


def _series(rows: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[float, float]]]:
    varying = _varying(rows, SETTINGS)
    out: dict[str, list[tuple[float, float]]] = {}
    seen = set()
    for r in rows:
        if r.get(metric) is None or (r["run_key"], metric) in seen:  # a reused row is the same point
            continue
        seen.add((r["run_key"], metric))
        label = ", ".join(f"{r.get(k)}" if k == "sampler" else f"{k}={r.get(k)}" for k in varying) or str(r.get("sampler"))
        out.setdefault(label, []).append((float(r["steps"]), float(r[metric])))
    return out


def write_summary(folder: Path) -> dict[str, Path]:
    """results.csv / results.md / quality_vs_steps.png in the sweep folder, from every job's result.json."""
    rows = collect(folder)
    if not rows:
        return {}
    columns = _columns(rows)
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = _varying(rows, RUN_COLUMNS) + [c for c in columns if c in MAIN or c.startswith("cond_acc/")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in shown) + " |" for r in rows]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    panels = [("FD (lower is better)", _series(rows, "fd")), ("KID (lower is better)", _series(rows, "kid"))]
    if any("cond_acc" in r for r in rows):
        panels.append(("conditional accuracy (higher is better)", _series(rows, "cond_acc")))
    plot = line_chart(panels, folder / "quality_vs_steps.png")
    return {"csv": folder / "results.csv", "markdown": folder / "results.md", "plot": plot}


class SweepSummary(Callback):
    """Hydra callback (conf/evaluate.yaml): at the end of a -m sweep print the table, and log it with the
    plot to W&B when logger=wandb."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        files = write_summary(folder)
        if not files:
            return
        print(f"\nsweep results ({folder}):\n" + files["markdown"].read_text())
        print(f"plot: {files['plot']}\ntable: {files['csv']}")
        if "wandb" in (config.get("logger") or {}):
            self.log_wandb(config, folder, files)

    @staticmethod
    def log_wandb(config: DictConfig, folder: Path, files: dict[str, Path]) -> None:
        import wandb

        from difflab.loggers import use_wandb_offline_without_key

        use_wandb_offline_without_key()
        rows = collect(folder)
        columns = _columns(rows)
        run = wandb.init(project=config.logger.wandb.get("project", "difflab"), group=f"evaluate-{folder.name}",
                         name=f"sweep-summary-{folder.name}", job_type="evaluate-summary", dir=str(folder), reinit=True)
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        run.log({"sweep/results": table, "sweep/quality_vs_steps": wandb.Image(str(files["plot"]))})
        run.finish()

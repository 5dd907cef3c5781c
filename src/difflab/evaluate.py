"""evaluate.py: sample n images of a model on every rank and score them against cached real features (scoring.py),
then write result.json / results.csv and print a table (results.py).

In a -m sweep each job also refreshes the sweep's results table and quality-vs-steps plot (metrics/summary.py);
a job whose effective settings equal an earlier job's (e.g. sampler=ddpm, which ignores steps=) reuses that job's
result instead of sampling again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.checkpoint import CheckpointError
from difflab.config import configuration_label, hydra_choice, instantiate_group, to_container, use_tf32
from difflab.images import grid, save_npz, save_png
from difflab.loggers import quiet_duplicate_logs, start_loggers, use_wandb_offline_without_key
from difflab.metrics.suite import MetricsConfig, MetricsContext
from difflab.model import DiffusionModel, load_model
from difflab.phema import ema_length
from difflab.results import find_reusable, run_key, score_row, sweep_dir, write_result
from difflab.sampling import SamplingSpec, eval_plan
from difflab.scoring import ScoringModule, save_scores
from difflab.validate import check_trainer_config, integer

log = logging.getLogger(__name__)


def data_identity(model: DiffusionModel, cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The identity train.py saved (checked against the files now), or for data=... the one given."""
    now = datamodule.identity()
    if cfg.get("data"):
        return {**now, "choice": hydra_choice("data")}
    saved = model.data or {**now, "choice": None}  # checkpoints from before identities were saved
    changed = [f for f, digest in saved.get("files", {}).items() if now["files"].get(f, digest) != digest]
    if changed:
        log.warning(f"{', '.join(changed)} changed since this model was trained (sha256 differs): scores compare against today's files")
    return saved


def started_loggers(cfg: DictConfig) -> list[Any]:
    loggers = instantiate_group(cfg.get("logger"))
    start_loggers(loggers, to_container(cfg), configuration_label(cfg))
    return loggers


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    use_tf32(cfg.get("tf32", True))
    quiet_duplicate_logs()
    integer("n", cfg.n, 2, " (FD/KID need at least 2 samples; compare runs at equal n, e.g. n=1000)")
    check_trainer_config(cfg.trainer)
    spec = SamplingSpec.from_config(cfg)
    if "wandb" in (cfg.get("logger") or {}):
        use_wandb_offline_without_key()
    weights = ema_length(cfg)
    model = load_model(cfg.ckpt, ema_length=weights, search_dir=Path(cfg.paths.log_dir) / "train")
    data_cfg = to_container(cfg.data) if cfg.get("data") else dict(model.config["data"])
    out_dir = Path(cfg.paths.output_dir)
    sampling = {k: v for k, v in spec.bind(model).record().items() if k != "steps_requested"}  # what runs, not what was typed
    key = run_key({"ckpt": str(model.source.resolve()), "mtime": model.source.stat().st_mtime, "ema_length": weights, "n": cfg.n,
                   "sampling": sampling, "metrics": to_container(cfg.metrics), "data": data_cfg})

    previous = find_reusable(key, sweep_dir(), out_dir)
    if previous is not None:
        row = dict(previous["row"], steps_requested=spec.steps, reused_from=str(Path(previous["output_dir"]).name))
        log.info(f"same effective settings as {row['reused_from']}: reusing its result")
        return write_result(cfg, row, previous.get("reference"), out_dir, loggers=started_loggers(cfg))

    datamodule = instantiate(data_cfg)
    datamodule.setup("test")
    if model.class_names and list(datamodule.class_names) != model.class_names:
        raise CheckpointError(f"the checkpoint's classes {model.class_names} differ from the data set's {list(datamodule.class_names)}")
    samples = eval_plan(cfg.n, spec, model, data_cfg, datamodule)
    mcfg: MetricsConfig = instantiate(cfg.metrics)
    context = MetricsContext(mcfg, datamodule, data_identity(model, cfg, datamodule), conditional=model.num_classes > 0)

    loggers = started_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False)
    module = ScoringModule(model, spec, samples, context, datamodule.train_set.tensors[0])
    trainer.test(module, verbose=False)
    if not trainer.is_global_zero:
        return module.results
    values = module.results
    row = {**score_row(module.plan, cfg.n, mcfg.feature, values, module.seconds, trainer.world_size,
                     context.scorer), "ema_length": weights,
           "run_key": key, "reused_from": None}
    reference = None
    if cfg.get("reference", True):
        reference = {k: v for k, v in context.reference(spec.seed).items() if not k.startswith("_")}
    if module.made:
        save_png(grid(torch.from_numpy(module.made["images"][:64]).permute(0, 3, 1, 2), 8), out_dir / "samples.png")
        if cfg.get("save_samples", True):
            save_npz(out_dir / "samples.npz", **module.made, class_names=np.array(model.class_names, dtype=str))
    if "_distance" in values:
        np.savez(out_dir / "nearest_train.npz", distance=values["_distance"].numpy(), nearest=values["_nearest"].numpy())
    save_scores(out_dir / "scores.npz", values, context)
    return write_result(cfg, row, reference, out_dir, loggers)

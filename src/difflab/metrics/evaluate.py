"""evaluate.py: sample n images from a checkpoint on every rank (a Lightning test run over chunk indices),
score them against cached real features, write result.json / results.csv and print a table.

In a -m sweep each job also refreshes the sweep's results table and quality-vs-steps plot (summary.py);
a job whose effective settings equal an earlier job's (e.g. sampler=ddpm, which ignores steps=)
reuses that job's result instead of sampling again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from difflab.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint, resolve_checkpoint
from difflab.config import PROJECT_ROOT, instantiate_group, to_container
from difflab.images import grid, save_png
from difflab.metrics.sampling import SamplePlan, class_plan, generate_chunk
from difflab.metrics.suite import MetricsConfig, MetricsContext, resolve_dirs
from difflab.samplers.base import Sampler
from difflab.validate import check_sampling, check_trainer_config

log = logging.getLogger(__name__)


class _Chunks(DistributedSampler):
    """This rank's chunk positions as they are: a DistributedSampler, so Lightning does not re-split them
    (its own would pad the shares by repeating samples)."""

    def __init__(self, dataset: list[int]) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)

    def __iter__(self):
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


class EvalModule(L.LightningModule):
    def __init__(self, net: torch.nn.Module, schedule: torch.nn.Module, sampler: Sampler, plan: SamplePlan,
                 context: MetricsContext, seed: int = 0) -> None:
        super().__init__()
        self.net, self.schedule = net, schedule
        self.sampler, self.plan, self.context, self.seed = sampler, plan, context, seed
        self.results: dict[str, Any] = {}
        self.preview: torch.Tensor | None = None
        self.seconds = 0.0

    def test_dataloader(self) -> DataLoader:
        chunks = self.plan.chunks_for(self.global_rank, self.trainer.world_size)
        return DataLoader(chunks, batch_size=None, sampler=_Chunks(chunks))

    def on_test_start(self) -> None:
        self.context.feature_net.to(self.device)
        if self.context.classifier is not None:
            self.context.classifier.to(self.device)
        self.context.device = self.device
        self.metrics = self.context.new_metrics(self.global_rank, self.trainer.world_size, self.seed)
        self.start = time.perf_counter()

    def test_step(self, chunk: Any, batch_idx: int) -> None:
        chunk = int(chunk)
        if chunk < 0:
            return
        from difflab.callbacks import autocast_dtype

        images, labels, index = generate_chunk(self.net, self.schedule, self.sampler, self.plan, chunk, autocast_dtype(self.trainer))
        self.metrics.update(images, labels, index)
        if chunk == 0:
            self.preview = images[:64].cpu()

    def on_test_epoch_end(self) -> None:
        self.results = self.metrics.compute()
        self.seconds = time.perf_counter() - self.start  # after the gather: the slowest rank's sampling + scoring


def effective_sampler(cfg: DictConfig) -> DictConfig:
    sampler_cfg = cfg.sampler.copy()
    if cfg.get("steps") is not None:
        if "steps" in sampler_cfg:
            sampler_cfg.steps = cfg.steps
        else:
            log.warning(f"{sampler_cfg._target_} runs all T steps: steps={cfg.steps} does not apply")
    return sampler_cfg


def sampler_name(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("sampler")
        if choice:
            return str(choice)
    return str(cfg.sampler._target_).rsplit(".", 1)[-1].replace("Sampler", "").lower()


def run_key(ckpt_path: Path, cfg: DictConfig, sampler_cfg: DictConfig, data_cfg: dict[str, Any]) -> str:
    """Everything that decides the numbers: equal keys give equal results (the sweep reuses them)."""
    parts = {"ckpt": str(ckpt_path.resolve()), "mtime": ckpt_path.stat().st_mtime, "ema": cfg.ema,
             "sampler": OmegaConf.to_container(sampler_cfg, resolve=True), "n": cfg.n, "seed": cfg.seed,
             "batch_size": cfg.batch_size, "guidance": cfg.guidance, "metrics": to_container(cfg.metrics), "data": data_cfg,
             "precision": str(cfg.trainer.get("precision"))}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    return None


def find_reusable(key: str, folder: Path | None, own: Path) -> dict[str, Any] | None:
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


def check_request(cfg: DictConfig) -> None:
    check_sampling(cfg, 2, " (FD/KID need at least 2 samples; compare runs at equal n, e.g. n=1000)")
    check_trainer_config(cfg.trainer)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from difflab.train import quiet_duplicate_logs, use_wandb_offline_without_key

    quiet_duplicate_logs()
    check_request(cfg)
    if "wandb" in (cfg.get("logger") or {}):
        use_wandb_offline_without_key()
    ckpt_path = resolve_checkpoint(cfg.ckpt, Path(cfg.paths.log_dir) / "train")
    ckpt = load_checkpoint(ckpt_path)
    net, schedule = build_from_checkpoint(ckpt, ema=cfg.ema)
    class_names = list(ckpt.get("class_names") or [])
    data_cfg = to_container(cfg.data) if cfg.get("data") else dict(ckpt["difflab_config"]["data"])
    sampler_cfg = effective_sampler(cfg)
    out_dir = Path(cfg.paths.output_dir)
    key = run_key(ckpt_path, cfg, sampler_cfg, data_cfg)
    name = sampler_name(cfg)

    previous = find_reusable(key, sweep_dir(), out_dir)
    if previous is not None:
        row = dict(previous["row"], sampler=name, steps_requested=cfg.get("steps"),
                   reused_from=str(Path(previous["output_dir"]).name))
        log.info(f"same effective settings as {row['reused_from']}: reusing its result")
        return finish(cfg, row, previous.get("reference"), out_dir, loggers=instantiate_group(cfg.get("logger")))

    datamodule = instantiate(data_cfg)
    datamodule.setup("test")
    if class_names and list(datamodule.class_names) != class_names:
        raise CheckpointError(f"the checkpoint's classes {class_names} differ from the data set's {list(datamodule.class_names)}")
    sampler = instantiate(sampler_cfg)
    k = getattr(net, "num_classes", 0)
    plan = class_plan(cfg.n, cfg.batch_size, cfg.seed, k, cfg.guidance, data_cfg, datamodule)
    mcfg = resolve_dirs(MetricsConfig.from_mapping(to_container(cfg.metrics)), PROJECT_ROOT)
    context = MetricsContext(mcfg, datamodule, data_cfg, conditional=k > 0)

    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False)
    module = EvalModule(net, schedule, sampler, plan, context, seed=cfg.seed)
    trainer.test(module, verbose=False)
    if not trainer.is_global_zero:
        return module.results
    values = module.results
    n_steps = len(sampler.timesteps(schedule.timesteps))
    row: dict[str, Any] = {
        "sampler": name, "steps": n_steps, "steps_requested": cfg.get("steps"), "n": cfg.n, "guidance": cfg.guidance,
        "seed": cfg.seed, "ema": cfg.ema, "feature": mcfg.feature, "ckpt": str(ckpt_path),
        "schedule": type(schedule).__name__.removesuffix("Schedule").lower(), "timesteps": schedule.timesteps,
        **{k: v for k, v in values.items() if not k.startswith("_")},
        "seconds": round(module.seconds, 2), "images_per_second": round(cfg.n / max(module.seconds, 1e-9), 2),
        "world_size": trainer.world_size, "run_key": key, "reused_from": None,
    }
    reference = None
    if cfg.get("reference", True):
        reference = {k: v for k, v in context.reference(cfg.seed).items() if not k.startswith("_")}
    if module.preview is not None:
        save_png(grid(module.preview, 8), out_dir / "samples.png")
    if "_distance" in values:
        np.savez(out_dir / "nearest_train.npz", distance=values["_distance"].numpy(), nearest=values["_nearest"].numpy())
    return finish(cfg, row, reference, out_dir, loggers)


def finish(cfg: DictConfig, row: dict[str, Any], reference: dict[str, Any] | None, out_dir: Path, loggers: list) -> dict[str, Any]:
    from difflab.metrics.summary import log_to_loggers, print_result, write_summary
    from difflab.train import finish_wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_container(cfg)
    result = {"row": row, "reference": reference, "config": config, "output_dir": str(out_dir)}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    flat = dict(row)
    flat.update({f"ref/{k}": v for k, v in (reference or {}).items()})
    flat.update({f"config/{k}": v for k, v in _flatten(config).items() if not k.startswith(("paths", "hydra"))})
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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d) if isinstance(d, list) else d}

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

from difflab.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint, objective_of, resolve_checkpoint
from difflab.config import hydra_choice, instantiate_group, to_container
from difflab.images import grid, save_npz, save_png
from difflab.loggers import finish_wandb, quiet_duplicate_logs, use_wandb_offline_without_key
from difflab.metrics.suite import MetricsConfig, MetricsContext
from difflab.samplers.base import Sampler
from difflab.sampling import (
    SamplePlan,
    check_output_stage,
    class_plan,
    effective_sampler,
    guidance_of,
    inference_dtype,
    inference_net,
    output_stage,
    resolve_palette,
)
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
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # this rank's (images, labels, index)
        self.samples: dict[str, np.ndarray] = {}  # all ranks' samples in index order, on rank 0
        self.seconds = 0.0

    def test_dataloader(self) -> DataLoader:
        chunks = self.plan.chunks_for(self.global_rank, self.trainer.world_size)
        return DataLoader(chunks, batch_size=None, sampler=_Chunks(chunks))

    def on_test_start(self) -> None:
        self.net = inference_net(self.net, self.plan.precision, self.device)
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
        images, labels, index = self.plan.generate_chunk(self.net, self.schedule, self.sampler, chunk)
        self.metrics.update(images, labels, index)
        self.parts.append((images.cpu(), labels.cpu() if labels is not None else None, index.cpu()))

    def on_test_epoch_end(self) -> None:
        self.results = self.metrics.compute()
        self.seconds = time.perf_counter() - self.start  # after the gather: the slowest rank's sampling + scoring
        parts = self.parts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        if self.trainer.is_global_zero and parts:
            index = torch.cat([p[2] for p in parts])
            order = index.argsort()
            labels = [p[1] for p in parts if p[1] is not None]
            self.samples = {"images": torch.cat([p[0] for p in parts])[order].permute(0, 2, 3, 1).numpy(),  # (N, H, W, C)
                            "index": index[order].numpy()}
            if labels:
                # one-hot contexts (N, K) float32, as sample.py and the data set files
                self.samples["labels"] = torch.nn.functional.one_hot(torch.cat(labels)[order], self.plan.num_classes).float().numpy()


def sampler_name(cfg: DictConfig) -> str:
    choice = hydra_choice("sampler")
    if choice:
        return str(choice)
    return str(cfg.sampler._target_).rsplit(".", 1)[-1].replace("Sampler", "").lower()


def run_key(ckpt_path: Path, cfg: DictConfig, sampler_cfg: DictConfig, data_cfg: dict[str, Any], palette: str | None) -> str:
    """Everything that decides the numbers: equal keys give equal results (the sweep reuses them)."""
    parts = {"ckpt": str(ckpt_path.resolve()), "mtime": ckpt_path.stat().st_mtime, "ema": cfg.ema,
             "sampler": OmegaConf.to_container(sampler_cfg, resolve=True), "n": cfg.n, "seed": cfg.seed,
             "batch_size": cfg.batch_size, "guidance": cfg.guidance, "guidance_interval": cfg.get("guidance_interval"),
             "guidance_rescale": cfg.get("guidance_rescale"), "palette": [palette, cfg.get("palette_colors") if palette else None], "metrics": to_container(cfg.metrics), "data": data_cfg,
             "precision": str(cfg.precision)}
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


def data_identity(ckpt: dict[str, Any], cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The identity train.py saved (checked against the files now), or for data=... the one given."""
    now = datamodule.identity()
    if cfg.get("data"):
        return {**now, "choice": hydra_choice("data")}
    saved = ckpt.get("difflab_data") or {**now, "choice": None}  # checkpoints from before identities were saved
    changed = [f for f, digest in saved.get("files", {}).items() if now["files"].get(f, digest) != digest]
    if changed:
        log.warning(f"{', '.join(changed)} changed since this model was trained (sha256 differs): scores compare against today's files")
    return saved


def check_request(cfg: DictConfig) -> None:
    check_sampling(cfg, 2, " (FD/KID need at least 2 samples; compare runs at equal n, e.g. n=1000)")
    check_trainer_config(cfg.trainer)
    inference_dtype(cfg.precision, "cpu")  # the name is checked here, the device once the trainer has one
    guidance_of(cfg)
    check_output_stage(cfg.get("palette"), cfg.get("palette_colors", 16))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    quiet_duplicate_logs()
    check_request(cfg)
    if "wandb" in (cfg.get("logger") or {}):
        use_wandb_offline_without_key()
    ckpt_path = resolve_checkpoint(cfg.ckpt, Path(cfg.paths.log_dir) / "train")
    ckpt = load_checkpoint(ckpt_path)
    net, schedule = build_from_checkpoint(ckpt, ema=cfg.ema)
    class_names = list(ckpt.get("class_names") or [])
    data_cfg = to_container(cfg.data) if cfg.get("data") else dict(ckpt["difflab_config"]["data"])
    sampler_cfg = effective_sampler(cfg.sampler, cfg.get("steps"))
    out_dir = Path(cfg.paths.output_dir)
    palette = resolve_palette(cfg.get("palette"), data_cfg)
    key = run_key(ckpt_path, cfg, sampler_cfg, data_cfg, palette)
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
    plan = class_plan(cfg.n, cfg.batch_size, cfg.seed, k, guidance_of(cfg), data_cfg, datamodule, cfg.precision,
                      objective=objective_of(ckpt),
                      post=output_stage(palette, cfg.get("palette_colors", 16), datamodule.train_set.tensors[0]))
    mcfg: MetricsConfig = instantiate(cfg.metrics)
    context = MetricsContext(mcfg, datamodule, data_identity(ckpt, cfg, datamodule), conditional=k > 0)

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
        "guidance_interval": str(plan.guidance.interval or ""), "guidance_rescale": plan.guidance.rescale,
        "palette": f"{palette}:{cfg.get('palette_colors', 16)}" if palette else "",
        "seed": cfg.seed, "ema": cfg.ema, "feature": mcfg.feature, "ckpt": str(ckpt_path),
        "precision": str(next(module.net.parameters()).dtype).removeprefix("torch."),
        "schedule": type(schedule).__name__.removesuffix("Schedule").lower(), "timesteps": schedule.timesteps,
        **{k: v for k, v in values.items() if not k.startswith("_")},
        "seconds": round(module.seconds, 2), "images_per_second": round(cfg.n / max(module.seconds, 1e-9), 2),
        "world_size": trainer.world_size, "run_key": key, "reused_from": None,
    }
    reference = None
    if cfg.get("reference", True):
        reference = {k: v for k, v in context.reference(cfg.seed).items() if not k.startswith("_")}
    if module.samples:
        save_png(grid(torch.from_numpy(module.samples["images"][:64]).permute(0, 3, 1, 2), 8), out_dir / "samples.png")
        if cfg.get("save_samples", True):
            save_npz(out_dir / "samples.npz", **module.samples, class_names=np.array(class_names, dtype=str))
    if "_distance" in values:
        np.savez(out_dir / "nearest_train.npz", distance=values["_distance"].numpy(), nearest=values["_nearest"].numpy())
    return finish(cfg, row, reference, out_dir, loggers)


def finish(cfg: DictConfig, row: dict[str, Any], reference: dict[str, Any] | None, out_dir: Path, loggers: list) -> dict[str, Any]:
    from difflab.metrics.summary import log_to_loggers, print_result, write_summary

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

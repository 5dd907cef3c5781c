"""Train the data set's classifier on the train split of the diffusion DataModule's own deterministic split,
report its held-out (val split) accuracy overall and per class, save it for the metrics."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.config import instantiate_group, to_container
from difflab.metrics.classifier import ClassifierModule, class_weights, predict_logits, save_classifier
from difflab.metrics.scores import ClassAccuracy
from difflab.validate import check_trainer_config, integer, number

log = logging.getLogger(__name__)


def held_out_report(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy of ``net`` on uint8 images, computed exactly as the metrics classify (predict_logits)."""
    y = labels.argmax(1)
    acc = ClassAccuracy(len(class_names))
    acc.update(predict_logits(net, images), y)
    balanced, per_class, weighted = acc.compute()
    total = torch.bincount(y, minlength=len(class_names)).tolist()
    return {
        "val_accuracy": float(weighted),
        "val_accuracy_balanced": float(balanced),  # mean over classes: what balanced conditional samples see
        "val_accuracy_per_class": {n: (float(a) if a == a else None) for n, a in zip(class_names, per_class.tolist())},
        "val_count_per_class": dict(zip(class_names, total)),
        "n_val": sum(total),
    }


def train_classifier(cfg: DictConfig) -> dict[str, Any]:
    check_trainer_config(cfg.trainer)
    number("lr", cfg.lr, 1e-12, hint=" (e.g. lr=3e-3)")
    # the one-cycle LR schedule is laid over the epochs, so they must be known before the first step
    integer("trainer.max_epochs", cfg.trainer.max_epochs, 1, " (the classifier's LR schedule spans its epochs, e.g. trainer.max_epochs=15)")
    integer("seed", cfg.seed, 0)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    class_names = list(datamodule.class_names)
    counts = datamodule.class_counts()
    net = instantiate(cfg.net)
    module = ClassifierModule(net, lr=cfg.lr, weight_decay=cfg.weight_decay, class_weights=class_weights(counts, cfg.class_weight_power),
                              label_smoothing=cfg.label_smoothing, max_shift=cfg.max_shift)
    n_params = sum(p.numel() for p in net.parameters())
    log.info(f"classifier: {n_params / 1e6:.3f}M parameters; train images per class {dict(zip(class_names, counts.int().tolist()))}")

    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[], enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start

    images, labels = datamodule.val_set.tensors[:2]
    report = held_out_report(net.cpu(), images, labels, class_names)
    report.update({"train_seconds": round(seconds, 1), "epochs": trainer.current_epoch, "n_train": len(datamodule.train_set),
                   "parameters": n_params, "split": {"val_size": datamodule.val_size, "split_seed": datamodule.split_seed,
                                                     "classes": datamodule.classes}})
    if trainer.is_global_zero:
        path = save_classifier(cfg.output, net, class_names, images.shape[-1], to_container(cfg.data), report)
        (Path(cfg.paths.output_dir) / "classifier_report.json").write_text(json.dumps(report, indent=2))
        print_report(report, path)
    return report


def print_report(report: dict[str, Any], path: Path) -> None:
    print(f"\nclassifier saved to {path} ({path.stat().st_size / 1e6:.2f} MB), trained in {report['train_seconds']} s")
    print(f"held-out accuracy {report['val_accuracy']:.4f} (class-balanced {report['val_accuracy_balanced']:.4f}) on {report['n_val']} val images")
    for name, acc in report["val_accuracy_per_class"].items():
        shown = f"{acc:.4f}" if acc is not None else "  -   "
        print(f"  {name:14s} {shown}  ({report['val_count_per_class'][name]} images)")

"""Sampling from a trained checkpoint: grid PNG, denoising-chain GIFs, uint8 arrays for evaluation."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from difflab.config import plain, use_tf32
from difflab.errors import ConfigError
from difflab.images import grid, save_gif, save_npz, save_png
from difflab.model import load_model
from difflab.phema import ema_length
from difflab.sampling import SamplingSpec, generate
from difflab.validate import integer

log = logging.getLogger(__name__)


class LabelError(ConfigError):
    """label= / context= that this model cannot draw."""


def class_index(label: str | int, class_names: Sequence[str]) -> int:
    """A class name or index -> index, or a LabelError listing the labels."""
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(class_names):
            return label
    elif str(label) in class_names:
        return list(class_names).index(str(label))
    choices = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
    raise LabelError(f"unknown label {label!r}; this model knows: {choices}")


def build_contexts(label: Any, context: Any, n: int, class_names: Sequence[str]) -> tuple[Tensor | None, int, list[str]]:
    """-> contexts (N, K) or None, grid row length, a caption per row.

    label=hero -> n hero images; label=[hero, food] or all -> n per class, one block of rows per class;
    context={hero: 1.0, food: 0.6} or a K-vector -> n images of that mix; nothing -> n unconditional.
    """
    k = len(class_names)
    if label is not None and context is not None:
        raise LabelError("give either label= or context=, not both")
    if context is not None:
        vec = torch.zeros(k)
        if isinstance(context, Mapping):
            for name, weight in context.items():
                vec[class_index(name, class_names)] = _weight(name, weight)
        elif isinstance(context, (list, tuple)):
            values = [_weight(i, v) for i, v in enumerate(context)]
            if len(values) != k:
                raise LabelError(f"context has {len(values)} entries, this model has {k} classes: {list(class_names)}")
            vec = torch.tensor(values)
        else:
            raise LabelError(f"context={context!r}: give a mix {{hero: 1.0, food: 0.6}} or a vector of {k} weights")
        desc = ", ".join(f"{w:g} {n}" for n, w in zip(class_names, vec.tolist()) if w)
        return vec.expand(n, k).clone(), grid_row(n), [desc or "zero context"]
    if label is None:
        return None, grid_row(n), ["unconditional"]
    if label == "all":
        labels: list[Any] = list(range(k))
    elif isinstance(label, (str, int)):
        labels = [label]
    elif isinstance(label, (list, tuple)) and label:
        labels = list(label)
    else:
        raise LabelError(f"label={label!r}: give a class name or index, a list [hero, food], or all")
    idx = [class_index(lab, class_names) for lab in labels]
    contexts = torch.eye(k)[idx].repeat_interleave(n, 0)
    row = n if len(idx) > 1 and n <= 16 else grid_row(n)
    return contexts, row, [class_names[i] for i in idx]


def _weight(name: Any, value: Any) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise LabelError(f"context entry {name}={value!r}: weights must be finite numbers >= 0 (e.g. context={{hero: 1.0, food: 0.6}})")
    return weight


def grid_row(n: int) -> int:
    """Images per grid row: a square-ish grid."""
    return max(1, math.ceil(math.sqrt(n)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError as err:
        raise ConfigError(f"device={name}: not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA GPU is visible here; use device=cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name}: use auto, cpu, cuda or cuda:N")
    return device


def sample(cfg: DictConfig) -> dict[str, Path]:
    use_tf32(cfg.get("tf32", True))
    integer("n", cfg.n, 1, " (images per label, or in all)")
    if cfg.gif:
        integer("frames", cfg.frames, 1, " (or gif=false)")
    spec = SamplingSpec.from_config(cfg)
    device = pick_device(cfg.device)
    weights = ema_length(cfg)
    model = load_model(cfg.ckpt, ema_length=weights, search_dir=Path(cfg.paths.log_dir) / "train").to(device)
    plan = spec.bind(model)  # palette=data: the model's training images, read before sampling
    class_names = model.class_names if model.num_classes else []
    if not model.num_classes and (cfg.label is not None or cfg.context is not None):
        raise LabelError(f"{model.source} is an unconditional model: drop label=/context=")
    label, context = plain(cfg.label), plain(cfg.context)
    contexts, nrow, captions = build_contexts(label, context, cfg.n, class_names)

    record = plan.record()
    n_steps, sampler_name = plan.steps, type(plan.sampler).__name__
    record_every = max(1, n_steps // cfg.frames) if cfg.gif else 0
    n_total = contexts.shape[0] if contexts is not None else cfg.n
    log.info(f"sampling {n_total} images with {sampler_name} ({n_steps} steps) from {model.source} on {device}")
    start = time.perf_counter()
    out = generate(plan, contexts, n_total, record_every=record_every, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    folder = Path(cfg.paths.output_dir)
    files = {
        "grid": save_png(grid(out.pixels, nrow), folder / "grid.png"),
        "samples": save_npz(
            folder / "samples.npz",
            images=out.pixels.permute(0, 2, 3, 1).numpy(),  # (N, H, W, 3) uint8, as the data set files
            labels=(contexts if contexts is not None else torch.zeros(n_total, len(class_names))).numpy().astype(np.float32),
            class_names=np.array(class_names, dtype=str),
            index=np.arange(n_total),  # image i's noise comes from (seed, i): the same image in evaluate.py's sample i
        ),
    }
    if cfg.gif:
        files["chain"] = save_gif([grid(x, nrow) for x in out.chain], folder / "chain.gif")
        files["x0_chain"] = save_gif([grid(x, nrow) for x in out.x0_chain], folder / "x0_chain.gif")
    meta = {"checkpoint": str(model.source), "n": n_total, "rows": captions, "ema_length": weights, "device": str(device), **record,
            "seconds": round(seconds, 3), "images_per_second": round(n_total / seconds, 2)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    files["meta"] = folder / "meta.json"
    print(f"\n{n_total} images in {seconds:.2f} s ({n_total / seconds:.1f} img/s), {n_steps} {sampler_name} steps")
    print(f"  rows: {'; '.join(captions)}")
    for name, path in files.items():
        print(f"  {name:9s} {path}")
    return files

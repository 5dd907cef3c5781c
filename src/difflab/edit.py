"""Editing existing sprites from the command line (edit.py): inpainting, variations and class transfer, interpolation.

The edits themselves are difflab.editing's; this module reads the inputs (a PNG or an image of the data set, a mask),
checks them, runs the edit through difflab.sampling.generate with the request's sampler, guidance and output stage, and
writes what sample.py writes: a grid PNG (the source and the mask beside the results), samples.npz (with the inputs),
GIFs and meta.json. Every input is checked before anything is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from difflab.config import plain, use_tf32
from difflab.errors import ConfigError
from difflab.images import grid, save_gif, save_npz, save_png
from difflab.masks import REGIONS, region
from difflab.model import DiffusionModel, load_model
from difflab.phema import ema_length
from difflab.sample import LabelError, class_index, grid_row, pick_device
from difflab.sampling import SamplingPlan, SamplingSpec, generate
from difflab.validate import integer

log = logging.getLogger(__name__)

COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}


class InputError(ConfigError):
    """An image or mask that cannot be edited as given."""


def read_image(spec: Any, model: DiffusionModel, alpha: Any = None) -> tuple[Tensor, int | None, str]:
    """-> (uint8 (C, H, W) at the model's size, its data label or None, a description). ``spec``: a PNG at the model's
    size or an integer upscale of it (pixel-art editors export 4x, 8x: each block must be one colour), or data:<i>, image
    i of the held-out split of the model's data set. ``alpha``: the colour transparent pixels are composited onto."""
    size = model.image_shape[-1]
    if isinstance(spec, str) and spec.startswith("data:"):
        held_out = _held_out(model)
        try:
            i = int(spec.removeprefix("data:"))
        except ValueError:
            i = -1
        if not 0 <= i < len(held_out[0]):
            raise InputError(f"image={spec}: give data:<i> with i in [0, {len(held_out[0]) - 1}] (the held-out images of its data set)")
        return held_out[0][i], int(held_out[1][i].argmax()), f"held-out image {i}"
    path = Path(str(spec))
    if not path.is_file():
        raise InputError(f"image={spec}: no such file; give a PNG ({size}x{size} or an integer upscale) or data:<i> for a held-out image")
    try:
        with Image.open(path) as img:
            img.load()
            pil = img.convert("RGBA")
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"image={spec}: not a readable image ({err}); give a PNG, or data:<i> for a held-out image") from err
    rgba = np.asarray(pil)
    h, w = rgba.shape[:2]
    if h != w or h % size:
        raise InputError(f"image={spec} is {w}x{h}; this model draws {size}x{size}: give a {size}x{size} PNG or an integer "
                         f"upscale of one ({2 * size}x{2 * size}, {4 * size}x{4 * size}, ...)")
    k = h // size
    if k > 1:  # an upscale by pixel repetition: every k x k block one colour
        blocks = rgba.reshape(size, k, size, k, 4)
        if not (blocks == blocks[:, :1, :, :1]).all():
            raise InputError(f"image={spec} is {w}x{h} but not a {k}x pixel upscale of a {size}x{size} sprite (its {k}x{k} blocks "
                             f"are not one colour each): downscale it to {size}x{size} with nearest-neighbour first")
        rgba = blocks[:, 0, :, 0]
    rgb = rgba[..., :3].astype(np.float64)
    a = rgba[..., 3:].astype(np.float64) / 255
    if (a < 1).any():
        if alpha is None:
            raise InputError(f"image={spec} has {int((a < 1).sum())} transparent pixels and the model knows opaque images: "
                             "add alpha=white (the sprites' background; or black, or [r,g,b]) to composite them onto that colour")
        rgb = a * rgb + (1 - a) * np.asarray(_colour(alpha), dtype=np.float64)
    return torch.from_numpy(rgb.round().astype(np.uint8)).permute(2, 0, 1).contiguous(), None, str(path)


def _colour(value: Any) -> tuple[int, int, int]:
    if isinstance(value, str) and value in COLOURS:
        return COLOURS[value]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3 and all(
            isinstance(v, int) and 0 <= v <= 255 for v in value):
        return tuple(value)
    raise InputError(f"alpha={value!r}: give white, black or [r,g,b] (0-255), the colour transparent pixels become")


def _held_out(model: DiffusionModel) -> tuple[Tensor, Tensor]:
    datamodule = instantiate(model.config["data"])
    datamodule.setup("fit")
    return datamodule.val_set.tensors[0], datamodule.val_set.tensors[1]


def read_mask(spec: Any, size: int) -> Tensor:
    """-> bool (1, H, W), true where pixels are filled. ``spec``: top | bottom | left | right | center (a half, or the middle
    half in each direction), a box [x0, y0, x1, y1] (pixels; x1, y1 excluded), or a PNG (white = fill) at the model's size
    or an integer upscale."""
    fill = torch.zeros(1, size, size, dtype=torch.bool)
    if isinstance(spec, str) and spec in REGIONS:
        fill[0] = region(spec, size)
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        box = list(spec)
        if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box) or \
                not (0 <= box[0] < box[2] <= size and 0 <= box[1] < box[3] <= size):
            raise InputError(f"mask={box}: give a box [x0,y0,x1,y1] with 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size} "
                             f"(x1, y1 excluded), a region ({', '.join(REGIONS)}) or a PNG")
        fill[0, box[1]:box[3], box[0]:box[2]] = True
    else:
        path = Path(str(spec))
        if not path.is_file():
            raise InputError(f"mask={spec}: not a region ({', '.join(REGIONS)}), a box [x0,y0,x1,y1] or a PNG file")
        try:
            with Image.open(path) as img:
                gray = np.asarray(img.convert("L"))
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"mask={spec}: not a readable image ({err}); give a PNG (white = fill) or a region") from err
        h, w = gray.shape
        if h != w or h % size:
            raise InputError(f"mask={spec} is {w}x{h}; the image is {size}x{size}: give a mask of the same size (or an integer upscale)")
        fill = torch.from_numpy(gray[:: h // size, :: h // size] >= 128)[None]
    if not fill.any():
        raise InputError(f"mask={spec} selects no pixel: nothing to fill; mark the pixels to redraw (white in a PNG)")
    if fill.all():
        raise InputError(f"mask={spec} selects every pixel: that is plain sampling (python sample.py label=...); keep some pixels")
    return fill


def edit(cfg: DictConfig) -> dict[str, Path]:
    use_tf32(cfg.get("tf32", True))
    spec = SamplingSpec.from_config(cfg)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, ema_length=ema_length(cfg), search_dir=Path(cfg.paths.log_dir) / "train").to(device)
    plan = spec.bind(model)
    mode = cfg.mode
    label = plain(cfg.label)
    folder = Path(cfg.paths.output_dir)
    if mode == "interpolate":
        return _interpolate(cfg, plan, label, folder)
    n = integer("n", cfg.n, 1, " (results per source)")
    alpha = plain(cfg.alpha)
    source, own_label, described = read_image(cfg.image, model, alpha)
    target = _one_label(model, label, own_label, cfg.image)
    sources = source.expand(n, *source.shape).contiguous()
    if mode == "inpaint":
        mask_spec = plain(cfg.mask)
        fill = read_mask(mask_spec, model.image_shape[-1])
        the_edit = instantiate(cfg.edit, source=sources, fill=fill.expand(n, *fill.shape).contiguous()).for_model(model.inpainting, plan.steps)
        inputs = {"source": source, "fill": fill[0]}
        shown = [source, _shade(source, fill[0])]
    else:
        the_edit = instantiate(cfg.edit, source=sources)
        inputs, shown = {"source": source}, [source]
    contexts = torch.eye(model.num_classes)[[target] * n] if target is not None else None
    record_every = max(1, plan.steps // cfg.frames) if cfg.gif else 0
    start = time.perf_counter()
    out = generate(plan, contexts, n, record_every=record_every, progress=True, edit=the_edit)
    seconds = time.perf_counter() - start

    row = len(shown) + n if n <= 14 else n
    panel = torch.cat([torch.stack(shown), out.pixels]) if n <= 14 else out.pixels
    files = {"grid": save_png(grid(panel, row), folder / "grid.png")}
    if n > 14:
        files["inputs"] = save_png(grid(torch.stack(shown), len(shown)), folder / "inputs.png")
    files["samples"] = save_npz(folder / "samples.npz", images=out.pixels.permute(0, 2, 3, 1).numpy(),
                                labels=(contexts if contexts is not None else torch.zeros(n, 0)).numpy().astype(np.float32),
                                class_names=np.array(model.class_names, dtype=str), index=np.arange(n),
                                **{k: (v.permute(1, 2, 0) if v.ndim == 3 else v).numpy() for k, v in inputs.items()})
    if cfg.gif:
        files["chain"] = save_gif([grid(x, grid_row(n)) for x in out.chain], folder / "chain.gif")
    return _finish(files, folder, plan, the_edit, {"image": str(cfg.image), "source": described,
                   "label": model.class_names[target] if target is not None else None, "n": n}, seconds, n, device)


def _interpolate(cfg: DictConfig, plan: SamplingPlan, label: Any, folder: Path) -> dict[str, Path]:
    model = plan.model
    frames = integer("frames", cfg.frames, 2, " (frames from one end to the other, both included)")
    seeds = plain(cfg.seeds)
    if not (isinstance(seeds, Sequence) and not isinstance(seeds, str) and len(seeds) == 2):
        raise ConfigError(f"seeds={seeds!r}: give the two ends' seeds, seeds=[3,8] (the same seed twice: only the label moves)")
    seeds = [integer("seeds", s, 0) for s in seeds]
    labels = label if isinstance(label, Sequence) and not isinstance(label, str) else [label, label]
    if len(labels) != 2:
        raise LabelError(f"label={label!r}: give one label, or two (label=[hero,weapon]) for the two ends")
    if model.num_classes and None in labels:
        raise LabelError(f"label= is needed: the class of the ends ({', '.join(model.class_names)}), or two of them")
    if not model.num_classes and any(lab is not None for lab in labels):
        raise LabelError(f"{model.source} is an unconditional model: drop label=")
    if seeds[0] == seeds[1] and labels[0] == labels[1]:
        raise ConfigError(f"seeds={seeds} and label={labels[0]}: both ends are the same image; give two seeds or two labels")
    weights = torch.linspace(0, 1, frames, dtype=torch.float64)
    contexts = None
    if model.num_classes:
        ends = torch.eye(model.num_classes)[[class_index(lab, model.class_names) for lab in labels]].double()
        # c = (1 - w) c_a + w c_b: a mix of the two classes, as context= gives
        contexts = ((1 - weights)[:, None] * ends[0] + weights[:, None] * ends[1]).float()
    the_edit = instantiate(cfg.edit, ends=[(seeds[0], 0), (seeds[1], 0)], weights=weights)
    start = time.perf_counter()
    out = generate(plan, contexts, frames, edit=the_edit, progress=True)
    seconds = time.perf_counter() - start
    change = (out.pixels[1:].float() - out.pixels[:-1].float()).abs().mean((1, 2, 3))
    files = {"strip": save_png(grid(out.pixels, frames), folder / "strip.png"),
             "gif": save_gif([grid(x[None], 1) for x in torch.cat([out.pixels, out.pixels.flip(0)[1:-1]])], folder / "interpolation.gif",
                             duration_ms=120, hold_last_ms=120),
             "samples": save_npz(folder / "samples.npz", images=out.pixels.permute(0, 2, 3, 1).numpy(), weights=weights.numpy(),
                                 labels=(contexts if contexts is not None else torch.zeros(frames, 0)).numpy().astype(np.float32),
                                 class_names=np.array(model.class_names, dtype=str), seeds=np.array(seeds))}
    print(f"frame-to-frame change: mean {change.mean():.2f}, largest {change.max():.2f} (mean |pixel difference|, 0-255)")
    return _finish(files, folder, plan, the_edit, {"seeds": seeds, "labels": labels, "frames": frames,
                   "change_mean": round(float(change.mean()), 3), "change_max": round(float(change.max()), 3)},
                   seconds, frames, model.device)


def _one_label(model: DiffusionModel, label: Any, own: int | None, image: Any) -> int | None:
    if not model.num_classes:
        if label is not None:
            raise LabelError(f"{model.source} is an unconditional model: drop label=")
        return None
    if label is None:
        if own is None:
            raise LabelError(f"label= is needed for image={image}: the class to draw ({', '.join(model.class_names)})")
        return own
    if isinstance(label, Sequence) and not isinstance(label, str):
        raise LabelError(f"label={label}: give one class for an edit (two only for mode=interpolate)")
    return class_index(label, model.class_names)


def _shade(image: Tensor, fill: Tensor) -> Tensor:
    # the source with the pixels to fill tinted magenta, as a picture of the mask
    magenta = torch.tensor([255, 0, 255], dtype=torch.float32)[:, None, None]
    return torch.where(fill, (image.float() + magenta) / 2, image.float()).round().to(torch.uint8)


def _finish(files: dict[str, Path], folder: Path, plan: SamplingPlan, the_edit: Any, inputs: dict[str, Any], seconds: float,
            n: int, device: Any) -> dict[str, Path]:
    meta = {"checkpoint": str(plan.model.source), **inputs, **the_edit.record(), "device": str(device), **plan.record(),
            "seconds": round(seconds, 3)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    files["meta"] = folder / "meta.json"
    print(f"\n{n} images in {seconds:.2f} s: {the_edit.record()['edit']} with {type(plan.sampler).__name__}")
    for name, path in files.items():
        print(f"  {name:9s} {path}")
    return files

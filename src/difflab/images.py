"""Grids and GIFs of uint8 images (N, C, H, W), upscaled by pixel repetition so 16x16 sprites stay crisp."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def to_uint8(images: Tensor) -> Tensor:
    # [-1, 1] -> [0, 255]
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit_range(images: Tensor) -> Tensor:
    # uint8 [0, 255] -> [-1, 1], the diffusion models' and the classifier's input range
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()


def grid(images: Tensor, nrow: int, scale: int | None = None) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] or uint8 -> (H', W', C) uint8 grid, ``scale``x nearest-neighbour."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if scale is None:
        scale = max(1, 64 // images.shape[-1])  # 16px sprites -> 4x, 32px -> 2x
    images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    g = make_grid(images, nrow=nrow, padding=scale, pad_value=255)
    return g.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_gif(frames: list[np.ndarray], path: str | Path, duration_ms: int = 80, hold_last_ms: int = 1500) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = [Image.fromarray(f) for f in frames]
    durations = [duration_ms] * (len(pil) - 1) + [hold_last_ms]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=durations, loop=0)
    return path


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Like np.savez, but byte-identical for identical arrays (fixed zip timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())
    return path

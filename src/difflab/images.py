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


PALETTES = ("sprite", "data")


def snap_to_palette(images: Tensor, colors: int = 16, palette: np.ndarray | None = None) -> Tensor:
    """A pixel-art output stage for uint8 images (N, 3, H, W): every pixel moved to the nearest colour of a palette.

    palette None: each image's own ``colors`` colours (median cut, PIL, no dithering); else a fixed (K, 3) uint8
    palette (e.g. the data set's most frequent colours, data_palette), nearest in RGB.
    """
    if palette is None:
        out = []
        for img in images.permute(0, 2, 3, 1).cpu().numpy():
            q = Image.fromarray(img).quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            out.append(np.asarray(q.convert("RGB")))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)
    pal = torch.as_tensor(palette, dtype=torch.float32, device=images.device)  # (K, 3)
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).float()
    nearest = torch.cdist(pixels, pal).argmin(1)  # ||pixel - colour_k||_2, the first of equals on a tie
    return pal[nearest].round().to(torch.uint8).reshape(images.shape[0], *images.shape[2:], 3).permute(0, 3, 1, 2)


def rgb_codes(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> (N, H*W) int64: one integer per RGB colour, r << 16 | g << 8 | b."""
    rgb = images.long().flatten(2)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def data_palette(images: Tensor, colors: int = 64) -> np.ndarray:
    """The ``colors`` most frequent RGB colours of uint8 images (N, 3, H, W), most frequent first: (colors, 3) uint8."""
    codes, counts = rgb_codes(images).flatten().unique(return_counts=True)
    top = codes[counts.argsort(descending=True, stable=True)[:colors]]
    return torch.stack([(top >> 16) & 255, (top >> 8) & 255, top & 255], 1).to(torch.uint8).numpy()

"""Samples beside real sprites of the same class: python bench/beside_real.py <samples.npz> <out.png> [--real 4]

One row per class: the samples made for that class (sample.py label=all writes them class by class), a gap, then
``--real`` random real training sprites of the class (seeded). The grids of docs/results.md are made with it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from difflab.config import PROJECT_ROOT
from difflab.images import grid, save_png

SPRITES = PROJECT_ROOT / "data" / "sprites" / "pixel_sprites_16x16.npz"


def beside_real(samples: np.ndarray, labels: np.ndarray, per_class: int, real: int, seed: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 samples, (N,) class indices -> one grid image, a row per class: samples | real sprites."""
    data = np.load(SPRITES)
    real_images, real_labels = data["images"], data["labels"].argmax(1)
    rng = np.random.default_rng(seed)
    blank = np.full((1, *samples.shape[1:]), 255, np.uint8)
    rows = []
    for c in sorted(set(labels.tolist())):
        made = samples[labels == c][:per_class]
        picked = real_images[rng.choice(np.flatnonzero(real_labels == c), real, replace=False)]
        rows.append(np.concatenate([made, blank, picked]))
    return grid(torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2), per_class + 1 + real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="a samples.npz of sample.py (label=all) or evaluate.py")
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--real", type=int, default=4)
    args = parser.parse_args()
    z = np.load(args.samples)
    save_png(beside_real(z["images"], z["labels"].argmax(1), args.per_class, args.real), args.out)
    print(args.out)


if __name__ == "__main__":
    main()

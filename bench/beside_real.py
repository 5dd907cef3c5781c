"""Samples beside real images of the same class: python bench/beside_real.py <samples.npz> <out.png> [--real 4]
[--data cifar10 --data-root <folder> --unverified]

One row per class: the samples made for that class (sample.py label=all writes them class by class), a gap, then
``--real`` random real training images of the class (seeded). The grids of docs/results.md are made with it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from difflab.config import PROJECT_ROOT
from difflab.images import grid, save_png

SPRITES = PROJECT_ROOT / "data" / "sprites" / "pixel_sprites_16x16.npz"


def real_set(data: str, root: str | None = None, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 real training images and their (N,) class indices: the shipped sprites or CIFAR-10."""
    if data == "cifar10":
        from difflab.data.cifar10 import load_cifar10

        ds = load_cifar10(root or PROJECT_ROOT / "data" / "cifar10", train=True, download=False, verify_checksums=verify)
        return ds.data, np.asarray(ds.targets)
    with np.load(SPRITES) as z:
        return z["images"], z["labels"].argmax(1)


def beside_real(samples: np.ndarray, labels: np.ndarray, per_class: int, real: int, seed: int = 0,
                reals: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 samples, (N,) class indices -> one grid image, a row per class: samples | real images
    (``reals``: (images, class indices); default the shipped sprites)."""
    real_images, real_labels = reals if reals is not None else real_set("sprites")
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
    parser.add_argument("--data", choices=["sprites", "cifar10"], default="sprites")
    parser.add_argument("--data-root", default=None, help="CIFAR-10: the folder holding cifar-10-batches-py (default data/cifar10)")
    parser.add_argument("--unverified", action="store_true", help="CIFAR-10: skip torchvision's md5 checks (a trusted local copy)")
    args = parser.parse_args()
    z = np.load(args.samples)
    reals = real_set(args.data, args.data_root, not args.unverified)
    save_png(beside_real(z["images"], z["labels"].argmax(1), args.per_class, args.real, reals=reals), args.out)
    print(args.out)


if __name__ == "__main__":
    main()

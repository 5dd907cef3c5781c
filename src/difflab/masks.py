"""Inpainting masks: named regions, the masks an inpainting model is trained on, and the images it takes beside x_t.

A mask ``fill`` is bool (N, 1, H, W), true where pixels are to be drawn; the others are known (kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

REGIONS = ("top", "bottom", "left", "right", "center")
# the share of training masks of each kind: the four halves and the centre (the named regions), everything (plain
# sampling), and one to three random boxes of 3 pixels or more a side (masks a user draws)
TRAINING_MIX = {"halves": 0.4, "center": 0.1, "all": 0.1, "boxes": 0.4}


def region(name: str, size: int) -> Tensor:
    """-> bool (size, size): ``name`` in REGIONS (a half, or the middle half in each direction)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    half, quarter = size // 2, size // 4
    inner = lambda v: (quarter <= v) & (v < size - quarter)  # noqa: E731
    return {"top": yy < half, "bottom": yy >= half, "left": xx < half, "right": xx >= half,
            "center": inner(yy) & inner(xx)}[name]


def training_masks(n: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """n masks (n, 1, size, size) drawn from TRAINING_MIX, on the CPU (``generator``: None draws from torch's global RNG,
    which seed_everything seeds and a resumed run restores)."""
    u = torch.rand(n, generator=generator)
    cuts = torch.tensor(list(TRAINING_MIX.values())).cumsum(0)
    kind = torch.bucketize(u, cuts, right=True).clamp(max=len(cuts) - 1)  # 0 halves, 1 center, 2 all, 3 boxes
    halves = torch.stack([region(r, size) for r in REGIONS[:4]])[torch.randint(0, 4, (n,), generator=generator)]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    boxes = torch.zeros(n, size, size, dtype=torch.bool)
    count = torch.randint(1, 4, (n,), generator=generator)
    for j in range(3):
        w, h = torch.randint(3, size + 1, (2, n, 1, 1), generator=generator)
        x0 = (torch.rand(n, 1, 1, generator=generator) * (size - w + 1)).floor()
        y0 = (torch.rand(n, 1, 1, generator=generator) * (size - h + 1)).floor()
        box = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        boxes |= box & (j < count).view(n, 1, 1)
    k = kind.view(n, 1, 1)
    fill = torch.where(k == 0, halves, torch.where(k == 1, region("center", size), torch.where(k == 2, True, boxes)))
    return fill.unsqueeze(1)


def known_pixels(x0: Tensor, fill: Tensor) -> Tensor:
    """What an inpainting model sees beside x_t (N, C + 1, H, W): the known pixels of x0 (in [-1, 1]; 0 where filled)
    and the mask (+1 where filled, -1 where known)."""
    fill = fill.to(x0.device)
    return torch.cat([torch.where(fill, torch.zeros_like(x0), x0), fill.to(x0.dtype) * 2 - 1], dim=1)


def nothing_known(x: Tensor) -> Tensor:
    """known_pixels for plain sampling of a batch like x (N, C, H, W): every pixel to fill (built from x's shape, so an
    exported graph keeps its batch size free)."""
    return known_pixels(torch.zeros_like(x), torch.ones_like(x[:, :1], dtype=torch.bool))

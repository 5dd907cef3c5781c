"""How a run's randomness is derived and carried across restarts.

Every training step draws its randomness (flips, t, noise, dropout, context dropout) from the global
generators seeded with a hash of (seed, rank, step): a step is a function of the checkpoint it starts
from, whatever ran before it in this process (validation, sample grids, user callbacks), and each DDP
rank draws its own noise. The generators' full states also go into checkpoints, per rank, for code that
runs between steps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (seed, rank, step); SeedSequence hashes the triple, so nearby triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_step(seed: int, rank: int, step: int) -> None:
    torch.manual_seed(step_seed(seed, rank, step))  # CPU and every CUDA device


def collect_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA states, as tensors and plain types (checkpoints load with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's finalizer on 32-bit words held in int64 (the products wrap; the mask keeps their low 32 bits)
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def counter_normal(keys: Sequence[int], draw: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal numbers (len(keys), *shape), float32, made on ``device`` by integer hashing of (key, draw,
    element): a counter-based generator, so row b depends only on keys[b] (a 64-bit seed) and the draw number, whatever
    the batch, and a GPU makes them itself instead of copying them from the host. Two hashed 32-bit words per element
    give uniforms u1, u2 in (0, 1); z = sqrt(-2 ln u1) cos(2 pi u2) (Box-Muller), in float64."""
    k = torch.tensor([[key & _M32, (key >> 32) & _M32] for key in keys], dtype=torch.int64, device=device)
    n = math.prod(shape)
    j = torch.arange(2 * n, dtype=torch.int64, device=device)
    salt = (draw * 0x9E3779B9 + 0x632BE5AB) & _M32
    # per image and draw, two well-mixed words a, b; then element j -> fmix(fmix(j ^ a) ^ b): a bijection of j for each
    # (a, b), so within an image no two elements share a word, and other images (other a, b) get unrelated words
    a = _fmix32(_fmix32(k[:, :1] ^ salt) ^ k[:, 1:])
    b = _fmix32(a ^ 0x5BD1E995)
    h = _fmix32(_fmix32(j[None, :] ^ a) ^ b)
    u = (h.double() + 0.5) / 2.0**32
    z = (-2 * u[:, :n].log()).sqrt() * torch.cos(2 * math.pi * u[:, n:])
    return z.float().reshape(len(keys), *shape)

"""How a run's randomness is derived and carried across restarts.

Every training step draws its randomness (flips, t, noise, dropout, context dropout) from the global
generators seeded with a hash of (seed, rank, step): a step is a function of the checkpoint it starts
from, whatever ran before it in this process (validation, sample grids, user callbacks), and each DDP
rank draws its own noise. The generators' full states also go into checkpoints, per rank, for code that
runs between steps.
"""

from __future__ import annotations

import random
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

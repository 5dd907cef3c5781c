import os
from pathlib import Path

import pytest
import torch

from difflab.config import PROJECT_ROOT, register_resolvers

register_resolvers()

SHARED_DATA = Path(os.environ.get("DIFFLAB_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
SPRITES = PROJECT_ROOT / "data" / "sprites" / "pixel_sprites_16x16.npz"
CIFAR_ROOT = SHARED_DATA / "cifar10"


@pytest.fixture
def cifar_root() -> Path:
    if not (CIFAR_ROOT / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 copy not found in {CIFAR_ROOT} (set DIFFLAB_SHARED_DATA)")
    return CIFAR_ROOT


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (on a loaded 2-core machine, threads spin against each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

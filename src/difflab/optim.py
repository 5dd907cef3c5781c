"""Learning-rate schedules as LambdaLR factories: ``factory(optimizer, total_steps) -> LRScheduler``.

The multiplier is a small callable object (not a lambda) so LambdaLR saves its state in checkpoints
and a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from difflab.errors import ConfigError
from difflab.validate import choice

DECAYS = ("cosine", "linear", "constant")


class WarmupDecay:
    """lr multiplier: linear warmup 0 -> 1 over ``warmup_steps``, then decay to ``min_lr_ratio`` at ``total_steps``."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", min_lr_ratio: float = 0.0) -> None:
        choice("optim.lr_scheduler.scheduler.decay", decay, DECAYS)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = min(int(warmup_steps), self.total_steps - 1) if decay != "constant" else int(warmup_steps)
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        # cosine: m = r + (1 - r) (1 + cos(pi p)) / 2 ; linear: m = r + (1 - r)(1 - p)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def warmup_decay(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", min_lr_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, WarmupDecay(total_steps, warmup_steps, decay, min_lr_ratio))


def check_optimizer(factory: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    """conf/optim/'s optimizer (a partial: the parameters come later), its learning rate checked now, not at the first step."""
    keywords = getattr(factory, "keywords", {})
    if "lr" not in keywords:  # the optimizer's own default
        return factory
    lr = keywords["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optim.optimizer.lr={lr!r}: must be a finite number > 0 (e.g. optim.optimizer.lr=1e-3)")
    return factory

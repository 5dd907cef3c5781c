"""Checks of the values users type, before anything runs: each failure names the key, the value and a fix."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from difflab.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def integer(key: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}{hint}")
    return value


def number(key: str, value: Any, low: float = -math.inf, high: float = math.inf, hint: str = "") -> float:
    """A finite number in [low, high] (nan and inf never pass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        bounds = "a finite number" + (f" in [{low:g}, {high:g}]" if math.isfinite(low) and math.isfinite(high)
                                      else f" >= {low:g}" if math.isfinite(low) else f" <= {high:g}" if math.isfinite(high) else "")
        raise ConfigError(f"{key}={value!r}: must be {bounds}{hint}")
    return float(value)


def choice(key: str, value: Any, options: Sequence[Any], hint: str = "") -> Any:
    """One of ``options``, as typed (None is YAML's null)."""
    if value not in options:
        names = ", ".join("null" if o is None else str(o) for o in options)
        raise ConfigError(f"{key}={value}: choose one of {names}{hint}")
    return value


def precisions() -> tuple[str, ...]:
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return get_args(_PRECISION_INPUT_STR_ALIAS) + get_args(_PRECISION_INPUT_STR)


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """trainer.precision / accelerator / devices / max_epochs as Lightning will read them, checked before it builds anything."""
    import torch

    precision = str(trainer.get("precision"))
    known = precisions()
    if precision not in known:
        raise ConfigError(f"trainer.precision={precision}: not a precision Lightning knows; use one of {', '.join(known)} "
                          "(bf16-mixed on CPUs with AVX512-BF16/AMX and recent GPUs, 16-mixed on older GPUs, else 32)")
    accelerator = str(trainer.get("accelerator"))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator}: use one of {', '.join(ACCELERATORS)}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA GPU is visible here; use trainer.accelerator=cpu (or auto)")
    devices = trainer.get("devices")
    if not (devices == "auto" or isinstance(devices, (list, tuple)) or isinstance(devices, int) and not isinstance(devices, bool)
            and (devices >= 1 or devices == -1)):
        raise ConfigError(f"trainer.devices={devices!r}: give a count >= 1, -1 (all), auto, or a list of device indices")
    if accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={devices}: only {torch.cuda.device_count()} CUDA GPU(s) visible here")
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None:
        integer("trainer.max_epochs", max_epochs, -1, " (-1: no epoch limit, with trainer.max_steps or max_time)")
    max_steps = trainer.get("max_steps")
    if max_steps is not None:
        integer("trainer.max_steps", max_steps, -1, " (-1: no step limit)")
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        number("trainer.gradient_clip_val", clip, 0, hint=" (null: no clipping)")

"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2): choose
the length of the weights' EMA after training.

During training, PostHocEMA keeps power-function EMAs of the weights with a few relative standard deviations (0.05 and
0.10) and saves them every N steps into the run folder (phema/step_00001200.pt). Any other length is then a linear
combination of those snapshots: the one whose averaging profile is closest, in L2 over training time, to the wanted
power-function profile (a least-squares solve over the profiles' inner products, closed form). ``rebuild`` does that;
load_model calls it for ``ema.length=...``.

Time is counted in optimizer steps (EDM2 counts images; with a fixed batch size the two are one axis). A length is the
profile's standard deviation relative to its age: 0.05 at step 10,000 averages over a spread of about 500 steps.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from difflab.errors import CheckpointError, ConfigError
from difflab.validate import integer

FOLDER = "phema"  # in the run folder, beside checkpoints/
# a rebuilt profile may miss the asked one by this relative L2 distance (the solve states it exactly): at 5% the
# rebuilt weights are a profile whose length is within a few percent of the one asked
MAX_RESIDUAL = 0.05


def exp_to_std(exp: Any) -> np.ndarray:
    # EDM2 Eq. 123: sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))


MAX_LENGTH = float(exp_to_std(0.0))  # exponent 0: the plain running mean of all weights so far, sqrt(1/12)


def std_to_exp(std: Any) -> np.ndarray:
    # EDM2 Eq. 126: the largest real root g of g^3 + 7 g^2 + (16 - sigma^-2) g + (12 - sigma^-2)
    std = np.float64(std)
    return np.float64([np.roots([1, 7, 16 - s, 12 - s]).real.max() for s in std.ravel() ** -2]).reshape(std.shape)


@functools.lru_cache(maxsize=None)
def _exponent(std: float) -> float:  # a root finder per call: once per length, not once per training step
    return float(std_to_exp(std))


def beta(std: float, t: int) -> float:
    # EDM2 Eq. 127: beta_t = (1 - 1/t)^(g + 1), t the steps so far with this one (beta_1 = 0: the first weights)
    return (1 - 1 / t) ** (_exponent(float(std)) + 1)


def inner(a_t: Any, a_std: Any, b_t: Any, b_std: Any) -> np.ndarray:
    # EDM2 Eq. 151: <p_a, p_b> for power-function profiles p(tau) = (g + 1) tau^g / t^(g + 1) on [0, t]
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    a_t, b_t = np.float64(a_t), np.float64(b_t)
    ratio_exp = np.where(a_t < b_t, b_exp, -a_exp)
    return (a_exp + 1) * (b_exp + 1) * (a_t / b_t) ** ratio_exp / ((a_exp + b_exp + 1) * np.maximum(a_t, b_t))


def coefficients(steps: Sequence[int], stds: Sequence[float], step: int, length: float) -> tuple[np.ndarray, float]:
    """Weights x of the snapshots (at ``steps``, of relative lengths ``stds``) whose combination is closest to the
    profile of ``length`` at ``step``, and the relative L2 distance left: ||p - sum x_i p_i|| / ||p||."""
    col = lambda v: np.float64(v).reshape(-1, 1)  # noqa: E731
    a = inner(col(steps), col(stds), col(steps).T, col(stds).T)  # A_ij = <p_i, p_j>
    b = inner(col(steps), col(stds), step, length)[:, 0]  # b_i = <p_i, p>
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # EDM2 Alg. 3: A x = b (lstsq: A is near singular for dense snapshots)
    x /= x.sum()  # the weights of an average sum to 1
    pp = float(inner(step, length, step, length))
    return x, math.sqrt(max(pp - 2 * x @ b + x @ a @ x, 0.0) / pp)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    stds: tuple[float, ...]
    end: bool  # written when training ended between two due snapshots


def snapshots(folder: Path) -> list[Snapshot]:
    """The snapshots in a run's phema/ folder, by step."""
    found = []
    for path in sorted((folder / FOLDER).glob("step_*.pt")):
        match = re.fullmatch(r"step_(\d+)\.pt", path.name)
        if match:
            meta = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            found.append(Snapshot(path, int(match.group(1)), tuple(float(s) for s in meta["stds"]), bool(meta.get("end"))))
    return found


def check_length(length: float) -> float:
    if isinstance(length, bool) or not isinstance(length, (int, float)) or not 0 < length <= MAX_LENGTH:
        raise ConfigError(f"ema.length={length!r}: a post-hoc EMA length is a relative standard deviation in (0, {MAX_LENGTH:.3f}] "
                          "(EDM2's: 0.05 averages over the last ~5% of training), e.g. ema.length=0.05; null: the checkpoint's own "
                          "EMA; 0: the raw training weights")
    return float(length)


def check_ema_length(length: Any) -> float | None:
    """ema.length: None (the EMA the run trained with, callbacks.ema), 0 (the raw training weights) or a post-hoc length."""
    if length is None or (not isinstance(length, bool) and isinstance(length, (int, float)) and length == 0):
        return None if length is None else 0.0
    return check_length(length)


def ema_length(cfg: Mapping[str, Any]) -> float | None:
    """An entry point's ema.length, checked."""
    node = cfg.get("ema")
    if not isinstance(node, Mapping):
        raise ConfigError(f"ema={node!r}: the weights are chosen with ema.length=...: null (the EMA the run trained with), 0 (the "
                          "raw training weights) or a post-hoc EMA length such as 0.05")
    return check_ema_length(node.get("length"))


def rebuild(run: Path, step: int, length: float) -> dict[str, torch.Tensor]:
    """The network weights of the power-function EMA of ``length`` at ``step``, from the snapshots in ``run``/phema."""
    length = check_length(length)
    found = [s for s in snapshots(run) if s.step <= step]
    if not found:
        raise CheckpointError(f"{run / FOLDER}: no post-hoc EMA snapshots, so ema.length cannot be rebuilt: train with "
                              "callbacks=posthoc_ema (or use ema.length=null, the checkpoint's own EMA)")
    if found[-1].step != step:
        raise CheckpointError(f"{run / FOLDER}: no snapshot at step {step}, the checkpoint's (the last is at {found[-1].step}): "
                              "give the run's last checkpoint (ckpt=<run folder>)")
    steps = [s.step for s in found for _ in s.stds]
    stds = [std for s in found for std in s.stds]
    x, residual = coefficients(steps, stds, step, length)
    if residual > MAX_RESIDUAL:
        reachable = [f"{v:.3g}" for v in np.geomspace(0.005, MAX_LENGTH, 60) if coefficients(steps, stds, step, v)[1] <= MAX_RESIDUAL]
        span = f"lengths {reachable[0]} to {reachable[-1]} are" if reachable else "no length is"
        raise ConfigError(f"ema.length={length}: {len(found)} snapshots rebuild it only to {residual:.0%} (at most {MAX_RESIDUAL:.0%}); "
                          f"{span} within reach: ask for one of those, or train with snapshots more often "
                          "(callbacks.posthoc_ema.every_n_steps)")
    total: dict[str, torch.Tensor] = {}
    i = 0
    for s in found:  # one snapshot in memory at a time; float64 sums (the weights alternate in sign)
        saved = torch.load(s.path, map_location="cpu", weights_only=True)
        for profile in saved["profiles"]:
            for name, value in profile.items():
                total[name] = total.get(name, 0) + float(x[i]) * value.double()
            i += 1
    return {name: value.float() for name, value in total.items()}


def save_atomically(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PostHocEMA(L.Callback):
    """Power-function EMAs of the network's parameters (relative lengths ``stds``), saved every ``every_n_steps``
    optimizer steps (or every ``every_n_images`` training images) and at the end, into <run folder>/phema/.

    Costs: len(stds) float32 copies of the parameters in memory, and as much disk per snapshot (4.5M parameters, two
    profiles: 38.6 MB). The profiles are in the checkpoints, so a resumed run continues them exactly; every DDP rank keeps
    its own (the weights are the same on every rank) and global rank 0 writes."""

    def __init__(self, stds: Sequence[float] = (0.05, 0.10), every_n_steps: int | None = None, every_n_images: int | None = None) -> None:
        stds = tuple(float(check_length(s)) for s in stds)
        if not stds or len(set(stds)) != len(stds):
            raise ConfigError(f"callbacks.posthoc_ema.stds={list(stds)}: give two or more different lengths, e.g. [0.05, 0.10]")
        if (every_n_steps is None) == (every_n_images is None):
            raise ConfigError("callbacks.posthoc_ema: give one of every_n_steps or every_n_images (e.g. every_n_steps=100)")
        for key, value in (("every_n_steps", every_n_steps), ("every_n_images", every_n_images)):
            if value is not None:
                integer(f"callbacks.posthoc_ema.{key}", value, 1)
        self.stds, self.every_n_steps, self.every_n_images = stds, every_n_steps, every_n_images
        self.step = 0  # the optimizer steps averaged in
        self.images = 0  # the training images seen at self.step, over all ranks
        self.profiles: list[dict[str, torch.Tensor]] | None = None
        self.folder: Path | None = None

    @staticmethod
    def params(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return dict(pl_module.net.named_parameters())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder = Path(trainer.default_root_dir) / FOLDER

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run rewrites what followed its checkpoint, and an end-of-training snapshot off the grid is no end now
        if trainer.is_global_zero and self.folder is not None:
            for s in snapshots(self.folder.parent):
                if s.step > self.step or (s.step == self.step and s.end):
                    s.path.unlink()

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:  # an accumulation micro-batch: the weights did not move
            return
        params = self.params(pl_module)
        if self.profiles is None:
            self.profiles = [{k: p.detach().float().clone() for k, p in params.items()} for _ in self.stds]
        batch_images = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
        self.images += batch_images * trainer.world_size * (trainer.global_step - self.step)
        self.step = trainer.global_step
        for std, profile in zip(self.stds, self.profiles):
            weight = 1 - beta(std, self.step)  # ema <- ema + (1 - beta) (w - ema)
            for name, p in params.items():
                ema = profile[name]
                if ema.device != p.device:
                    profile[name] = ema = ema.to(p.device)
                ema.lerp_(p.detach().float(), weight)
        if self.due(batch_images * trainer.world_size):
            self.save(trainer, end=False)

    def due(self, step_images: int) -> bool:
        if self.every_n_steps is not None:
            return self.step % self.every_n_steps == 0
        return self.images // self.every_n_images > (self.images - step_images) // self.every_n_images

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.profiles is not None and self.folder is not None and not self.path(self.step).exists():
            self.save(trainer, end=True)  # the end of training: the time lengths are rebuilt at

    def path(self, step: int) -> Path:
        assert self.folder is not None
        return self.folder / f"step_{step:08d}.pt"

    def save(self, trainer: L.Trainer, end: bool) -> None:
        if trainer.is_global_zero and self.folder is not None and self.profiles is not None:
            profiles = [{k: v.cpu() for k, v in profile.items()} for profile in self.profiles]
            save_atomically({"step": self.step, "images": self.images, "stds": list(self.stds), "end": end,
                             "profiles": profiles},
                            self.path(self.step))

    def state_dict(self) -> dict[str, Any]:
        return {"stds": list(self.stds), "step": self.step, "images": self.images,
                "profiles": self.profiles}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if tuple(state_dict["stds"]) != self.stds:
            raise CheckpointError(f"the checkpoint tracks post-hoc EMA lengths {state_dict['stds']}, this run {list(self.stds)}: "
                                  "resume with the run's own callbacks.posthoc_ema.stds")
        self.step, self.images = state_dict["step"], state_dict["images"]
        self.profiles = state_dict["profiles"]

"""A LightningDataModule for small labelled image sets held in memory as uint8 tensors.

Batches are fetched with one tensor index per batch (``__getitems__``), not one Python call per image,
and scaled to [-1, 1] / flipped on the device after transfer. Batches are tuples:
train ``(x0, context)``; val ``(x0, context, noise, u)`` where the fixed ``noise`` and ``u`` in [0, 1)
(t = floor(u T)) make the validation loss deterministic and comparable across runs (the same t fractions under any schedule and T).

Training is exactly resumable: the order is a pure function of (seed, epoch) (``EpochSampler``); a
checkpoint records how many batches of the epoch were trained on (in the DataModule's state) and a resumed
run skips exactly those; and every training batch first seeds the global generators from
(seed, rank, batch count) (rng.py), so its flips and all the step draws after them (t, noise, dropout,
context dropout) do not depend on what ran before in the process.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from difflab.errors import ConfigError, DataError
from difflab.rng import seed_step
from difflab.validate import integer


class Arrays(NamedTuple):
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N, K) float32, one-hot or multi-hot


class TensorBatches(Dataset):
    """Aligned tensors indexed along dim 0; a list of indices gives a whole batch in one gather."""

    def __init__(self, *tensors: Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(x[i] for x in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(indices)
        return tuple(x[idx] for x in self.tensors)


def _batched(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # __getitems__ already returns stacked tensors
    return batch


class EpochSampler(DistributedSampler):
    """This rank's training indices for one epoch, drawn from a generator seeded with seed + epoch.

    shuffle: a permutation; weights: draws with replacement in proportion to them (class balancing).
    It is a DistributedSampler, so Lightning keeps it under DDP instead of wrapping it: the ranks take
    interleaved shares of the same epoch order, as torch's DistributedSampler does. ``resume = (epoch,
    batches)`` leaves out that many of this rank's batches once, if the first epoch iterated is that epoch.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0, epoch: int = 0,
                 weights: Tensor | None = None, batch_size: int = 1, resume: tuple[int, int] | None = None) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = weights
        self.epoch = epoch
        self.batch_size = batch_size
        self.resume = resume

    def epoch_order(self, epoch: int) -> Tensor:
        """All ranks' indices of ``epoch`` (length total_size), before the split between ranks."""
        n = len(self.dataset)
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        if self.total_size > n:  # pad to a multiple of the ranks by repeating the start (DistributedSampler's rule)
            order = torch.cat([order, order[: self.total_size - n]])
        return order[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        # a generator: the epoch is read at the first batch, after Lightning's set_epoch
        skip = 0
        if self.resume is not None:
            epoch, batches = self.resume
            skip = batches * self.batch_size if epoch == self.epoch else 0
            self.resume = None
        yield from self.epoch_order(self.epoch)[self.rank :: self.num_replicas][skip:].tolist()


class ResumableLoader(DataLoader):
    """Tells Lightning that this loader resumes mid-epoch (else it warns that it does not).

    The position itself travels in the DataModule's state (``ArrayDataModule.state_dict``): Lightning hands
    a loader its state only if ``trainer.estimated_stepping_batches`` was not read before (Lightning issue
    #20550), and the LR schedule reads it in ``configure_optimizers``.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ArrayDataModule(L.LightningDataModule):
    def __init__(
        self,
        class_names: Sequence[str],
        batch_size: int = 128,
        val_size: float | int = 0.1,
        classes: Sequence[str] | None = None,
        balanced: bool = False,
        limit: int | None = None,
        hflip: bool = True,
        split_seed: int = 0,
        num_workers: int = 0,
        image_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        integer("data.batch_size", batch_size, 1)
        integer("data.num_workers", num_workers, 0)
        integer("data.split_seed", split_seed, 0)
        if limit is not None:
            integer("data.limit", limit, 1)
        if seed is not None:
            integer("seed", seed, 0)
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or isinstance(val_size, float) and not 0 < val_size < 1:
            raise ConfigError(f"data.val_size={val_size!r}: give a fraction in (0, 1) (e.g. 0.1) or a number of images (e.g. 500)")
        self.class_names = list(class_names)
        self.batch_size = batch_size
        self.val_size = val_size
        self.classes = list(classes) if classes else None
        self.balanced = balanced
        self.limit = limit
        self.hflip = hflip
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.image_size = image_size
        # the data order's seed: the run's seed, or a random one that checkpoints keep (so a resume continues it)
        self.seed = seed if seed is not None else secrets.randbits(31)
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        unknown = [c for c in self.classes or [] if c not in self.class_names]
        if unknown:
            raise ConfigError(f"unknown class {unknown} in data.classes; this data set has {self.class_names}")
        self.train_set: TensorBatches | None = None
        self.val_set: TensorBatches | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_arrays(self) -> Arrays:
        raise NotImplementedError

    def describe_source(self) -> str:
        """Where the arrays come from, for error messages."""
        return type(self).__name__

    name = "data"  # a short name for file names (the feature cache) and messages
    pixel_art = False  # True: palette=auto snaps samples to a small palette (see SamplingSpec.palette_for)

    def source_files(self) -> list[Path]:
        """The files the arrays are read from (their hash identifies the data set)."""
        return []

    def identity(self) -> dict[str, Any]:
        """What identifies this data set: its name, the sha256 of each source file, the classes it trains on.
        train.py adds the config group choice (data=...) and saves it in checkpoints as ``difflab_data``."""
        files = {}
        for path in self.source_files():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            files[path.name] = h.hexdigest()
        return {"name": self.name, "choice": None, "files": files, "classes": self.classes or list(self.class_names)}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays()
        check_labels(labels, self.describe_source())
        if labels.shape[1] != self.num_classes:
            raise DataError(f"labels have {labels.shape[1]} classes, the config lists {self.num_classes}: {self.class_names}")
        if self.image_size is not None and images.shape[-1] != self.image_size:
            raise DataError(f"images are {images.shape[-1]}px, the config expects {self.image_size}px")
        images_t = torch.from_numpy(np.ascontiguousarray(images))
        labels_t = torch.from_numpy(np.ascontiguousarray(labels))
        train_idx, val_idx = self.split(len(images_t))
        # split first, then select classes: an image held out of a full run stays held out of a subset run
        train_idx, val_idx = self.select(labels_t, train_idx), self.select(labels_t, val_idx)
        if self.limit is not None:
            # a random (seeded) subset, not the first rows: the files are grouped by source
            keep = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.split_seed))[: self.limit]
            train_idx = train_idx[keep.sort().values]
        self.train_set = TensorBatches(images_t[train_idx], labels_t[train_idx])
        g = torch.Generator().manual_seed(self.split_seed + 1)
        n_val = len(val_idx)
        noise = torch.randn((n_val, *images_t.shape[1:]), generator=g)
        u = (torch.randperm(n_val, generator=g).float() + 0.5) / max(n_val, 1)  # stratified over [0, 1)
        self.val_set = TensorBatches(images_t[val_idx], labels_t[val_idx], noise, u)

    def split(self, n: int) -> tuple[Tensor, Tensor]:
        n_val = int(round(self.val_size * n)) if isinstance(self.val_size, float) else int(self.val_size)
        if not 0 < n_val < n:
            raise ConfigError(f"data.val_size={self.val_size} leaves no train or no validation images out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def select(self, labels: Tensor, idx: Tensor) -> Tensor:
        if self.classes is None:
            return idx
        cols = [self.class_names.index(c) for c in self.classes]
        return idx[labels[idx][:, cols].sum(1) > 0]

    def class_counts(self) -> Tensor:
        assert self.train_set is not None
        return self.train_set.tensors[1].sum(0)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        weights = None
        if self.balanced:
            labels = self.train_set.tensors[1]
            # weight_i = sum_c y_ic / count_c: every class is drawn equally often
            weights = (labels / self.class_counts().clamp(min=1)).sum(1).double()
        trainer = self.trainer
        ranks, rank, epoch = (trainer.world_size, trainer.global_rank, trainer.current_epoch) if trainer else (1, 0, 0)
        sampler = EpochSampler(len(self.train_set), self.seed, ranks, rank, epoch, weights, self.batch_size, self._resume)
        drop_last = sampler.num_samples >= self.batch_size  # full batches only, unless the share is smaller than one
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_batched,
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the seed, and the last epoch started with the number of its batches trained on."""
        trainer = self.trainer
        if trainer is None:
            return {"seed": self.seed}
        loop = trainer.fit_loop
        # current_epoch already counts an epoch that has ended; the batch count belongs to the one last started
        return {"seed": self.seed, "epoch": loop.epoch_progress.current.started - 1, "batches": loop.epoch_loop.batch_progress.current.ready}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=0, collate_fn=_batched)

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, ...]:
        images, *rest = batch
        # uint8 [0, 255] -> [-1, 1]
        x = images.float() / 127.5 - 1.0
        trainer = self.trainer
        if trainer is not None and trainer.training:
            # batches started before this one (a resumed run's count continues the interrupted run's)
            seed_step(self.seed, trainer.global_rank, trainer.fit_loop.epoch_loop.batch_progress.total.ready)
        if self.hflip and trainer is not None and trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x, *rest)


def check_labels(labels: np.ndarray, source: str) -> None:
    """Labels are finite, non-negative, and give every image at least one class (the row of the first bad one is named)."""
    if labels.ndim != 2:
        raise DataError(f"{source}: labels must be (N, K) one-hot rows, got shape {labels.shape}")
    labels = np.asarray(labels, dtype=np.float64)
    for problem, bad in (("not finite", ~np.isfinite(labels).all(1)), ("negative", (labels < 0).any(1)),
                         ("all zero: every image needs a class", ~(labels > 0).any(1))):
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: label row {row} is {problem} ({labels[row].tolist()}); {int(bad.sum())} such row(s). "
                            "Fix the labels file (one-hot rows, e.g. [0, 1, 0, 0, 0])")

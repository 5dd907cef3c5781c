"""A LightningDataModule for small labelled image sets held in memory as uint8 tensors.

Batches are fetched with one tensor index per batch (``__getitems__``), not one Python call per image,
and scaled to [-1, 1] / flipped on the device after transfer. Batches are tuples:
train ``(x0, context)``; val ``(x0, context, noise, u)`` where the fixed ``noise`` and ``u`` in [0, 1)
(t = floor(u T)) make the validation loss deterministic and comparable across runs (the same t fractions under any schedule and T).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler


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
    ) -> None:
        super().__init__()
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
        unknown = [c for c in self.classes or [] if c not in self.class_names]
        if unknown:
            raise ValueError(f"unknown class {unknown} in data.classes; this data set has {self.class_names}")
        self.train_set: TensorBatches | None = None
        self.val_set: TensorBatches | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_arrays(self) -> Arrays:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays()
        if labels.shape[1] != self.num_classes:
            raise ValueError(f"labels have {labels.shape[1]} classes, the config lists {self.num_classes}: {self.class_names}")
        if self.image_size is not None and images.shape[-1] != self.image_size:
            raise ValueError(f"images are {images.shape[-1]}px, the config expects {self.image_size}px")
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
            raise ValueError(f"data.val_size={self.val_size} leaves no train or no validation images out of {n}")
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
        sampler = None
        if self.balanced:
            labels = self.train_set.tensors[1]
            # weight_i = sum_c y_ic / count_c: every class is drawn equally often
            weights = (labels / self.class_counts().clamp(min=1)).sum(1)
            sampler = WeightedRandomSampler(weights.double(), num_samples=len(weights), replacement=True)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(self.train_set) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_batched,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=0, collate_fn=_batched)

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, ...]:
        images, *rest = batch
        # uint8 [0, 255] -> [-1, 1]
        x = images.float() / 127.5 - 1.0
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x, *rest)

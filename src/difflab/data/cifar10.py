"""CIFAR-10 through torchvision (download when online), with an explicit opt-out of its md5 checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

from difflab.data.datamodule import ArrayDataModule, Arrays
from difflab.errors import DataError, DataNotFound


class _UncheckedCIFAR10(CIFAR10):
    """Reads the same pickles as CIFAR10 but trusts them: for copies rebuilt from other sources."""

    def _check_integrity(self) -> bool:
        return True


def load_cifar10(root: str | Path, train: bool = True, download: bool = True, verify_checksums: bool = True) -> CIFAR10:
    root = Path(root)
    folder = root / CIFAR10.base_folder
    if not verify_checksums:
        if not folder.is_dir():
            raise DataNotFound(f"CIFAR-10 not found: no {folder}. {_how_to_get(root)}")
        warnings.warn(
            f"CIFAR-10 in {folder} is used without checking torchvision's md5 checksums (data.verify_checksums=false)",
            stacklevel=2,
        )
        return _UncheckedCIFAR10(str(root), train=train, download=False)
    try:
        return CIFAR10(str(root), train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError (corrupt) or URLError/OSError (offline)
        if folder.is_dir():
            raise DataError(
                f"CIFAR-10 files in {folder} do not match torchvision's md5 checksums ({err}). If this copy is "
                "trusted (e.g. rebuilt from public copies), set data.verify_checksums=false."
            ) from err
        raise DataNotFound(f"CIFAR-10 not found in {root} and not downloadable ({err}). {_how_to_get(root)}") from err


def _how_to_get(root: Path) -> str:
    return (
        "Run once with network access (data.download=true), or download cifar-10-python.tar.gz from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root.resolve()}, "
        "or point data.root=<folder that holds cifar-10-batches-py> at a local copy."
    )


class CIFAR10DataModule(ArrayDataModule):
    def __init__(self, root: str, download: bool = True, verify_checksums: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download
        self.verify_checksums = verify_checksums

    name = "cifar10"

    def source_files(self) -> list[Path]:
        folder = Path(self.root) / CIFAR10.base_folder
        names = [f for f, _ in CIFAR10.train_list] + [CIFAR10.meta["filename"]]
        return [folder / f for f in names if (folder / f).is_file()]

    def prepare_data(self) -> None:
        if self.verify_checksums and self.download:
            load_cifar10(self.root, train=True, download=True)

    def load_arrays(self) -> Arrays:
        ds = load_cifar10(self.root, train=True, download=False, verify_checksums=self.verify_checksums)
        if list(ds.classes) != list(self.class_names):
            raise DataError(f"CIFAR-10 meta names {ds.classes}, the config says {list(self.class_names)}")
        labels = np.eye(len(ds.classes), dtype=np.float32)[np.asarray(ds.targets)]
        return Arrays(ds.data.transpose(0, 3, 1, 2), labels)

"""16x16 pixel-art sprites from .npz/.npy arrays: the shipped 6-class set or the DeepLearning.AI course files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from difflab.data.datamodule import ArrayDataModule, Arrays
from difflab.errors import DataError, DataNotFound

HOW_TO_GET = (
    "The default 6-class set ships with the repository at data/sprites/pixel_sprites_16x16.npz "
    "(restore it with `git checkout data/sprites`). For the DeepLearning.AI course set, put "
    "sprites_1788_16x16.npy and sprite_labels_nc_1788_16x16.npy in data/sprites_course/ and use data=sprites_course, "
    "or point data.path=<images .npy/.npz> data.labels_path=<labels .npy/.npz> at them."
)


def _require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataNotFound(f"{what} not found at {path.resolve()}. {HOW_TO_GET}")
    return path


def load_sprite_arrays(path: str | Path, labels_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """-> images (N, H, W, 3) uint8, labels (N, K) float32, class names stored beside them (or None).

    ``path`` is an .npz with ``images`` (and ``labels``/``class_names``) or an .npy image array;
    ``labels_path`` (.npy one-hot, or .npz with ``labels``) overrides the labels inside ``path``.
    """
    path = _require(path, "sprite images")
    names = None
    labels = None
    images = _read(path, "images")
    if path.suffix == ".npz":
        labels = _read(path, "labels", required=False)
        stored = _read(path, "class_names", required=False)
        names = [str(n) for n in stored] if stored is not None else None
    if labels_path is not None:
        labels_path = _require(labels_path, "sprite labels")
        labels = _read(labels_path, "labels")
        if labels_path.suffix == ".npz":
            stored = _read(labels_path, "class_names", required=False)
            names = [str(n) for n in stored] if stored is not None else None
    if labels is None:
        raise DataError(f"{path} holds no labels: set data.labels_path=<labels .npy/.npz>")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"sprite images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape} in {path}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels ({path}, {labels_path})")
    return images, labels.astype(np.float32), names


def _read(path: Path, key: str, required: bool = True) -> np.ndarray | None:
    """One array of an .npz (by key) or the array of an .npy, with a clear error for broken or foreign files."""
    try:
        if path.suffix != ".npz":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            if key not in z:
                if required:
                    raise DataError(f"{path} has no '{key}' array (it has {list(z.keys())}): an .npz needs images (N, H, W, 3) uint8 and labels (N, K)")
                return None
            return z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable .npy/.npz ({type(err).__name__}: {err}); restore it "
                        "(git checkout data/sprites for the shipped set) or point data.path at a good copy") from err


class SpritesDataModule(ArrayDataModule):
    pixel_art = True  # few flat colours: sample.py / evaluate.py snap samples to a palette by default (palette=auto)

    def __init__(self, path: str, labels_path: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.labels_path = labels_path

    def describe_source(self) -> str:
        return str(self.labels_path or self.path)

    @property
    def name(self) -> str:
        return Path(self.path).name.split(".")[0]

    def source_files(self) -> list[Path]:
        return [Path(p) for p in (self.path, self.labels_path) if p and Path(p).is_file()]

    def load_arrays(self) -> Arrays:
        images, labels, names = load_sprite_arrays(self.path, self.labels_path)
        if names is not None and names != list(self.class_names):
            raise DataError(f"{self.path} names its classes {names}, the config says {list(self.class_names)}: fix data.class_names")
        return Arrays(images.transpose(0, 3, 1, 2), labels)

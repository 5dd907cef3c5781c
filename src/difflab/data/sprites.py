"""16x16 pixel-art sprites from .npz/.npy arrays: the shipped 6-class set or the DeepLearning.AI course files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difflab.data.datamodule import ArrayDataModule, Arrays

HOW_TO_GET = (
    "The default 6-class set ships with the repository at data/sprites/pixel_sprites_16x16.npz "
    "(restore it with `git checkout data/sprites`). For the DeepLearning.AI course set, put "
    "sprites_1788_16x16.npy and sprite_labels_nc_1788_16x16.npy in data/sprites_course/ and use data=sprites_course, "
    "or point data.path=<images .npy/.npz> data.labels_path=<labels .npy/.npz> at them."
)


def _require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path.resolve()}. {HOW_TO_GET}")
    return path


def load_sprite_arrays(path: str | Path, labels_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """-> images (N, H, W, 3) uint8, labels (N, K) float32, class names stored beside them (or None).

    ``path`` is an .npz with ``images`` (and ``labels``/``class_names``) or an .npy image array;
    ``labels_path`` (.npy one-hot, or .npz with ``labels``) overrides the labels inside ``path``.
    """
    path = _require(path, "sprite images")
    names = None
    labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
            if "labels" in z:
                labels = z["labels"]
            if "class_names" in z:
                names = [str(n) for n in z["class_names"]]
    else:
        images = np.load(path, allow_pickle=False)
    if labels_path is not None:
        labels_path = _require(labels_path, "sprite labels")
        if labels_path.suffix == ".npz":
            with np.load(labels_path, allow_pickle=False) as z:
                labels = z["labels"]
                names = [str(n) for n in z["class_names"]] if "class_names" in z else None
        else:
            labels = np.load(labels_path, allow_pickle=False)
    if labels is None:
        raise ValueError(f"{path} holds no labels: set data.labels_path=<labels .npy/.npz>")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"sprite images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape} in {path}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels ({path}, {labels_path})")
    return images, labels.astype(np.float32), names


class SpritesDataModule(ArrayDataModule):
    def __init__(self, path: str, labels_path: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.labels_path = labels_path

    def load_arrays(self) -> Arrays:
        images, labels, names = load_sprite_arrays(self.path, self.labels_path)
        if names is not None and names != list(self.class_names):
            raise ValueError(f"{self.path} names its classes {names}, the config says {list(self.class_names)}: fix data.class_names")
        return Arrays(images.transpose(0, 3, 1, 2), labels)

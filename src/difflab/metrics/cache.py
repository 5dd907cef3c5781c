"""Real-image features, computed once and cached on disk.

The key holds the data set name and split, a sha1 of the image bytes (so a changed split or file can
never reuse stale statistics), the preprocessing and the feature network's weights fingerprint. Under
DDP every rank that misses the cache computes the same features and writes them atomically, so no rank
waits on another (no barrier to hang on if one rank fails).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.metrics.features import FeatureNet

log = logging.getLogger(__name__)


def images_digest(images: Tensor) -> str:
    return hashlib.sha1(images.contiguous().cpu().numpy().tobytes()).hexdigest()


def cache_key(feature_net: FeatureNet, images: Tensor, dataset: str, split: str) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "split": split,
        "shape": list(images.shape),
        "images_sha1": images_digest(images),
        "preprocessing": feature_net.preprocessing,
        "feature_net": feature_net.cache_id(),
    }


def cache_file(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['dataset']}-{key['split']}-{key['feature_net'].split('-')[0]}-{digest}.pt"


@torch.no_grad()
def extract(feature_net: FeatureNet, images: Tensor, batch_size: int = 512, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """uint8 images -> (features float32, logits or None), on the CPU."""
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, lg = feature_net.features_and_logits(images[i : i + batch_size].to(device))
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def real_features(feature_net: FeatureNet, images: Tensor, dataset: str, split: str, cache_dir: str | Path | None,
                  batch_size: int = 512, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """(features, logits) of real uint8 images, from the cache when the key matches; cache_dir=None: no cache."""
    if cache_dir is None:
        return extract(feature_net, images, batch_size, device)
    key = cache_key(feature_net, images, dataset, split)
    path = cache_file(cache_dir, key)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                log.info(f"real {split} features from the cache: {path}")
                return blob["features"], blob.get("logits")
        except Exception as err:  # a truncated or foreign file: recompute and overwrite it
            log.warning(f"ignoring unreadable feature cache {path}: {err}")
    log.info(f"computing {feature_net.name} features of {len(images)} real {split} images (cached in {path})")
    features, logits = extract(feature_net, images, batch_size, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, "features": features, "logits": logits}, tmp)
    tmp.replace(path)
    return features, logits

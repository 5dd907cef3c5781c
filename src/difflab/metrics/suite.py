"""What every evaluation needs once (feature network, classifier, cached real features, memorization
reference), built from the metrics config group (conf/metrics/), and fresh SampleMetrics from it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from difflab.config import PROJECT_ROOT
from difflab.errors import ConfigError
from difflab.metrics.cache import real_features
from difflab.metrics.features import ClassifierFeatures, FeatureNet, build_feature_net, classifier_features
from difflab.metrics.scores import SampleMetrics

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


@dataclass
class MetricsConfig:
    feature: str = "classifier"  # classifier | inception: the network whose features FD/KID compare
    classifier_ckpt: str = "auto"  # a path, or auto: the one in classifiers_dir trained on these classes
    classifiers_dir: str = "data/classifiers"
    inception_weights: str | None = None
    inception_antialias: bool = True
    cache_dir: str | None = "data/cache"
    real_split: str = "train"  # the real images FD/KID compare against
    feature_batch_size: int = 512
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cond_acc: bool = True
    memorization: bool = True
    threshold: float = 0.05

    def __post_init__(self) -> None:
        if self.real_split not in SPLITS:
            raise ConfigError(f"metrics.real_split must be one of {SPLITS}, got {self.real_split!r}")
        for name in ("classifiers_dir", "cache_dir"):  # relative folders are the project root's, not the working directory's
            value = getattr(self, name)
            if value is not None and not Path(value).is_absolute():
                setattr(self, name, str(PROJECT_ROOT / value))

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | MetricsConfig | None) -> MetricsConfig:
        if isinstance(cfg, MetricsConfig):
            return cfg
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {"_target_"})
        if unknown:
            raise ConfigError(f"unknown metrics settings {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})


class MetricsContext:
    """Built once per run from a set-up ArrayDataModule; ``new_metrics`` gives a fresh SampleMetrics holding
    this rank's share of the real features."""

    def __init__(self, cfg: MetricsConfig, datamodule: Any, identity: Mapping[str, Any], conditional: bool,
                 device: torch.device | str = "cpu") -> None:
        """identity: the data set's name and config choice, as ArrayDataModule.identity() gives and train.py saves
        in checkpoints (names the cache files and the train_classifier.py command in hints)."""
        self.cfg = cfg
        self.class_names = list(datamodule.class_names)
        self.conditional = conditional
        self.dataset = str(identity.get("name") or "data")
        train_images = datamodule.train_set.tensors[0]
        self.image_size = int(train_images.shape[-1])
        self.splits = {"train": datamodule.train_set.tensors[:2], "val": datamodule.val_set.tensors[:2]}

        self.classifier: ClassifierFeatures | None = None
        if cfg.feature == "classifier" or (cfg.cond_acc and conditional):
            self.classifier = classifier_features(cfg.classifier_ckpt, self.class_names, self.image_size, cfg.classifiers_dir,
                                                  str(identity.get("choice") or "<your data>")).to(device)
        self.feature_net: FeatureNet = build_feature_net(cfg.feature, self.classifier, cfg.inception_weights, cfg.inception_antialias).to(device)
        self.device = device
        self.real = self.features_of(cfg.real_split)
        self.train_images = train_images if cfg.memorization else None

    @cached_property
    def scorer(self) -> str:
        """Which networks score: the sha1 (12 hex digits) of the feature network's and the classifier's identities (their
        weights' fingerprints, as the real-feature cache keys them; the classifier also gives the accuracies, and with
        feature=classifier it is the feature network). A retrained classifier is another ruler: figures compare only
        under the same scorer."""
        nets = [self.feature_net]
        if self.classifier is not None and self.classifier is not self.feature_net:
            nets.append(self.classifier)
        return hashlib.sha1("|".join(net.cache_id() for net in nets).encode()).hexdigest()[:12]

    def features_of(self, split: str) -> Tensor:
        """Cached features of a real split (FD/KID compare against them; the reference scores val as samples)."""
        images = self.splits[split][0]
        return real_features(self.feature_net, images, self.dataset, split, self.cfg.cache_dir, self.cfg.feature_batch_size, self.device)[0]

    def new_metrics(self, rank: int = 0, world: int = 1, seed: int = 0, sync: bool = True) -> SampleMetrics:
        m = SampleMetrics(self.feature_net, self.classifier if self.cfg.cond_acc else None, self.class_names, self.conditional,
                          self.train_images, self.cfg.threshold, self.cfg.kid_subsets, self.cfg.kid_subset_size, seed, sync)
        m.to(self.device)
        share = torch.arange(rank, len(self.real), world)
        m.add_real(self.real[share], share)
        return m

    def reference(self, seed: int = 0) -> dict[str, Any]:
        """The same scores for the real held-out (val) images as if they were samples, on this rank only: the
        floor FD/KID reach at this sample size, the classifier's held-out accuracy, and the memorization
        statistics that duplicate frames in the data set give real images."""
        images, labels = self.splits["val"]
        m = self.new_metrics(seed=seed, sync=False)
        index = torch.arange(len(images))
        for start in range(0, len(images), self.cfg.feature_batch_size):
            part = slice(start, start + self.cfg.feature_batch_size)
            m.update(images[part].to(self.device), labels[part].argmax(1).to(self.device), index[part].to(self.device))
        out = m.compute()
        out["n"] = len(images)
        return out

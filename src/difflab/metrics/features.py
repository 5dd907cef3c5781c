"""Feature networks for FD/KID: uint8 images (N, C, H, W) in, (N, num_features) float features out.

``classifier``: the penultimate layer of the data set's own classifier (classifier.py), which also gives
logits for class-conditional accuracy. ``inception``: the standard FID Inception-v3 (torch-fidelity's
port through torchmetrics), on images upsampled to 299x299; its weights come from
``metrics.inception_weights``, the torch hub cache, or a download, and offline without them it stops
with an error saying how to get them (it never waits on the network).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.errors import ConfigError, DifflabError
from difflab.images import to_unit_range
from difflab.metrics.classifier import find_classifier

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
FEATURE_KINDS = ("classifier", "inception")


class InceptionUnavailable(DifflabError, RuntimeError):
    """The FID Inception weights cannot be found or downloaded."""


def fingerprint(module: nn.Module) -> str:
    """sha1 of every parameter and buffer: the feature network's identity in cache keys."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureNet(nn.Module):
    """uint8 images -> features (and logits for classifiers). ``preprocessing`` names what is done to the
    images before the network: it is part of the real-statistics cache key."""

    name: str = "features"
    num_features: int
    preprocessing: str

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def train(self, mode: bool = True) -> FeatureNet:
        return super().train(False)  # a frozen measuring device: BatchNorm/dropout always in eval mode

    def cache_id(self) -> str:
        return f"{self.name}-{fingerprint(self)[:16]}"


class ClassifierFeatures(FeatureNet):
    name = "classifier"
    preprocessing = "uint8/127.5-1"

    def __init__(self, net: nn.Module, info: dict[str, Any]) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.info = info
        self.num_features = net.num_features
        self.class_names = list(info["class_names"])

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.net.features(to_unit_range(images))
        return feats, self.net.head(feats)


class InceptionFeatures(FeatureNet):
    """torchmetrics' NoTrainInceptionV3 (2048-d pool features), the network behind the standard FID."""

    name = "inception"
    num_features = 2048

    def __init__(self, weights: str | None = None, antialias: bool = True) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = inception_weights_path(weights)
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=path, antialias=antialias)
        except OSError as err:  # urllib's URLError is an OSError: the download failed after all
            raise InceptionUnavailable(_inception_help(f"downloading failed ({err})")) from err
        self.preprocessing = f"bilinear-299-antialias={antialias},(x-128)/128"

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, None]:
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures expects uint8 images (N, 3, H, W)")
        with torch.autocast(images.device.type, enabled=False):
            return self.net(images).float(), None

    def cache_id(self) -> str:
        return f"{self.name}-{fingerprint(self.net)[:16]}"


def _inception_help(reason: str) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    return (
        f"the FID Inception-v3 weights are not available: {reason}. Download {INCEPTION_URL} on a machine with internet "
        f"and pass metrics.inception_weights=<that .pth file> (or copy it to {cache}); or use the offline feature network "
        "metrics=classifier."
    )


def inception_weights_path(weights: str | None, host: str = "github.com", timeout: float = 3.0) -> str | None:
    """A local weights file, or None when torch-fidelity may download them (the hub cache has them or the host answers)."""
    if weights:
        if not Path(weights).is_file():
            raise InceptionUnavailable(_inception_help(f"metrics.inception_weights={weights} does not exist"))
        return str(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    if cached.is_file():
        return str(cached)
    if not reachable(host, 443, timeout):
        raise InceptionUnavailable(_inception_help(f"no metrics.inception_weights given, none in {cached.parent}, and {host} cannot be reached"))
    return None


def reachable(host: str, port: int, timeout: float) -> bool:
    """Can a TCP connection be opened within ``timeout`` s? Runs in a thread: DNS lookups ignore socket timeouts."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


class PassThrough(nn.Module):
    """Hands precomputed features to torchmetrics' FID/KID, so one feature pass serves FD, KID and accuracy."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()  # the MMD / covariance sums are taken in float64


def classifier_features(spec: str, class_names: Sequence[str], image_size: int, folder: str | Path, data_hint: str) -> ClassifierFeatures:
    return ClassifierFeatures(*find_classifier(spec, class_names, image_size, folder, data_hint))


def build_feature_net(kind: str, classifier: ClassifierFeatures | None, inception_weights: str | None = None,
                      inception_antialias: bool = True) -> FeatureNet:
    if kind == "classifier":
        if classifier is None:
            raise ConfigError("metrics.feature=classifier needs a classifier (metrics.classifier_ckpt)")
        return classifier
    if kind == "inception":
        return InceptionFeatures(inception_weights, inception_antialias)
    raise ConfigError(f"unknown metrics.feature={kind!r}; choose one of {FEATURE_KINDS}")

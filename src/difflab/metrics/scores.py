"""FD, KID, class-conditional accuracy, pixel-art colour statistics and memorization, as torchmetrics Metrics (their states sync across
DDP ranks in ``compute``). One feature pass per image feeds all of them (features.PassThrough).

Every sample carries its global index, and list states are put in index order before anything that
depends on order, so the values do not depend on how the samples were split over ranks.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

from difflab.images import rgb_codes
from difflab.metrics.features import FeatureNet, PassThrough

QUANTILES = (0.01, 0.05, 0.5)


def frechet_distance(num_features: int, sync: bool = True) -> FrechetInceptionDistance:
    # FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}), from float64 feature sums
    return FrechetInceptionDistance(feature=PassThrough(num_features), sync_on_compute=sync)


class KernelDistance(Metric):
    """KID = unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random equal-size subsets.

    torchmetrics' KernelInceptionDistance draws its subsets from the global RNG in rank order; here the
    features are sorted by sample index and the subsets come from a seeded generator, so the value is
    the same for any world size. subset_size shrinks to the smaller set when there are fewer samples.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        for name in ("real_features", "real_index", "fake_features", "fake_index"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, features: Tensor, index: Tensor, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features.double())
        (self.real_index if real else self.fake_index).append(index.long())

    def compute(self) -> tuple[Tensor, Tensor]:
        real = _in_index_order(self.real_features, self.real_index)
        fake = _in_index_order(self.fake_features, self.fake_index)
        m = min(self.subset_size, len(real), len(fake))
        if m < 2:
            raise RuntimeError(f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
        g = torch.Generator().manual_seed(self.seed)
        scores = torch.stack([
            poly_mmd(real[torch.randperm(len(real), generator=g)[:m].to(real.device)],
                     fake[torch.randperm(len(fake), generator=g)[:m].to(fake.device)], degree=3, gamma=None, coef=1.0)
            for _ in range(self.subsets)
        ])
        return scores.mean(), scores.std(unbiased=False)


def _in_index_order(values: list[Tensor] | Tensor, index: list[Tensor] | Tensor) -> Tensor:
    values, index = dim_zero_cat(values), dim_zero_cat(index)
    return values[index.argsort()]


class ClassAccuracy(MulticlassAccuracy):
    """acc_c = #{samples made for class c that the classifier assigns to c} / #{samples made for class c}.

    compute -> (class-balanced accuracy: the mean of acc_c over the classes that have samples; acc_c, NaN where
    class c has none; the frequency-weighted accuracy). torchmetrics' own macro average would count a class
    with predictions but no samples (a model trained on a subset of the classes) as 0.
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes, average="none", **kwargs)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        support = self.tp + self.fn
        per_class = torch.where(support > 0, self.tp / support.clamp(min=1), torch.nan).double()
        return per_class[support > 0].mean(), per_class, self.tp.sum().double() / support.sum().clamp(min=1)


class Predictions(Metric):
    """Every sample's label and predicted class, in sample order: what a bootstrap over the images resamples."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("labels", "predictions", "index"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor, index: Tensor) -> None:
        self.labels.append(labels.long())
        self.predictions.append(logits.argmax(1))
        self.index.append(index.long())

    def compute(self) -> tuple[Tensor, Tensor]:
        """-> (labels, predicted classes), in sample order."""
        return _in_index_order(self.labels, self.index), _in_index_order(self.predictions, self.index)


class PaletteStats(Metric):
    """Pixel-art statistics per image: the number of distinct RGB colours, and the share of its pixels that its
    ``top`` most frequent colours cover (real 16x16 sprites: a median of 8 colours, 100% covered by 16)."""

    full_state_update = False

    def __init__(self, top: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top = top
        self.add_state("colors", [], dist_reduce_fx="cat")
        self.add_state("coverage", [], dist_reduce_fx="cat")

    def update(self, images: Tensor) -> None:
        colors, coverage = palette_stats(images, self.top)
        self.colors.append(colors)
        self.coverage.append(coverage)

    def compute(self) -> dict[str, float]:
        colors, coverage = dim_zero_cat(self.colors).double(), dim_zero_cat(self.coverage).double()
        if not len(colors):
            return {}
        return {"colors_median": float(colors.median()), f"top{self.top}_share": float(coverage.mean()),
                f"top{self.top}_share_min": float(coverage.min())}


def palette_stats(images: Tensor, top: int = 16) -> tuple[Tensor, Tensor]:
    """uint8 (B, 3, H, W) -> (distinct colours (B,), share of pixels in the ``top`` most frequent colours (B,))."""
    colors, coverage = [], []
    for row in rgb_codes(images):
        counts = row.unique(return_counts=True)[1]
        colors.append(len(counts))
        coverage.append(counts.topk(min(top, len(counts))).values.sum() / len(row))
    device = images.device
    return torch.tensor(colors, device=device), torch.stack(coverage).to(device) if coverage else torch.zeros(0, device=device)


class NearestTrainDistance(Metric):
    """d(x) = min_y ||x - y||_2 / sqrt(D) over training images y and their mirror images (training flips them):
    the root-mean-square pixel difference to the closest training image, pixels in [0, 1]."""

    full_state_update = False

    def __init__(self, train_images: Tensor, chunk: int = 4096, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_images = train_images  # uint8 (N, C, H, W); a plain attribute: not a synced state
        self.chunk = chunk
        for name in ("distance", "nearest", "index"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, images: Tensor, index: Tensor) -> None:
        d, nearest = nearest_train(images, self.train_images, self.chunk)
        self.distance.append(d)
        self.nearest.append(nearest)
        self.index.append(index.long())

    def compute(self) -> tuple[Tensor, Tensor]:
        """-> (distance, nearest training index; index >= N means the mirrored image), in sample order."""
        return _in_index_order(self.distance, self.index), _in_index_order(self.nearest, self.index)


@torch.no_grad()
def nearest_train(images: Tensor, train_images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    # float32: the cancellation error in the expansion below is ~1e-3 in d, far under any useful threshold
    x = images.flatten(1).float() / 255
    n_train = len(train_images)
    best = torch.full((len(x),), torch.inf, device=x.device)
    arg = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for mirrored in (False, True):
        for start in range(0, n_train, chunk):
            ref = train_images[start : start + chunk].to(x.device)
            ref = (ref.flip(-1) if mirrored else ref).flatten(1).float() / 255
            # ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y
            d2 = (x.square().sum(1, keepdim=True) + ref.square().sum(1) - 2 * x @ ref.T).clamp(min=0)
            val, idx = d2.min(1)
            better = val < best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + start + (n_train if mirrored else 0), arg)
    # the distance to the chosen neighbour, exactly: copies come out as 0, not as the rounding error above
    ref = train_images[(arg % n_train).to(train_images.device)].to(x.device)  # the images may stay on the CPU
    ref = torch.where((arg >= n_train)[:, None, None, None], ref.flip(-1), ref).flatten(1).float() / 255
    return (x - ref).square().mean(1).sqrt(), arg


def distance_summary(distance: Tensor, threshold: float) -> dict[str, float]:
    d = distance.double().cpu()
    out = {"memorized": float((d < threshold).double().mean())}
    for q in QUANTILES:
        out[f"nn_dist_q{int(round(q * 100)):02d}"] = float(d.quantile(q))
    out["nn_dist_mean"] = float(d.mean())
    return out


class SampleMetrics(nn.Module):
    """All scores of one set of generated images against cached real features.

    feature_net gives the FD/KID features; classifier (may be the same network) the logits for the
    conditional accuracy of a conditional model (conditional=False or classifier=None: no accuracy);
    train_images the memorization reference (None: skipped). sync=False: compute on this rank only.
    """

    def __init__(self, feature_net: FeatureNet, classifier: FeatureNet | None, class_names: Sequence[str], conditional: bool,
                 train_images: Tensor | None = None, threshold: float = 0.05, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0, sync: bool = True) -> None:
        super().__init__()
        self.feature_net = feature_net
        self.classifier = classifier if classifier is not feature_net else None  # registered once
        self.class_names = list(class_names)
        self.threshold = threshold
        self.fd = frechet_distance(feature_net.num_features, sync)
        self.kid = KernelDistance(kid_subsets, kid_subset_size, seed, sync_on_compute=sync)
        use_acc = conditional and classifier is not None and bool(class_names)
        self.acc = ClassAccuracy(len(self.class_names), sync_on_compute=sync) if use_acc else None
        self.predictions = Predictions(sync_on_compute=sync) if use_acc else None
        self.palette = PaletteStats(sync_on_compute=sync)
        self.memo = NearestTrainDistance(train_images, sync_on_compute=sync) if train_images is not None else None

    def add_real(self, features: Tensor, index: Tensor) -> None:
        """Real features (this rank's share under DDP: every real row must be added on exactly one rank)."""
        features = features.to(self.fd.device)
        if len(features):
            self.fd.update(features, real=True)
        self.kid.update(features, index.to(features.device), real=True)

    @torch.no_grad()
    def update(self, images: Tensor, labels: Tensor | None, index: Tensor) -> None:
        """images uint8 (B, C, H, W); labels (B,) class indices the samples were made for, or None."""
        with torch.autocast(images.device.type, enabled=False):
            features, logits = self.feature_net.features_and_logits(images)
            if self.classifier is not None:
                logits = self.classifier.features_and_logits(images)[1]
        self.fd.update(features, real=False)
        self.kid.update(features, index, real=False)
        if self.acc is not None and labels is not None and logits is not None:
            self.acc.update(logits, labels)
            self.predictions.update(logits, labels, index)
        if images.shape[1] == 3:
            self.palette.update(images)
        if self.memo is not None:
            self.memo.update(images, index)

    def _fill_empty_states(self) -> None:
        # a rank that made no samples still gathers tensors of the right shape and dtype
        device = self.fd.device
        if not self.kid.fake_features:
            self.kid.fake_features.append(torch.zeros(0, self.feature_net.num_features, dtype=torch.float64, device=device))
            self.kid.fake_index.append(torch.zeros(0, dtype=torch.long, device=device))
        if not self.kid.real_features:
            self.kid.update(torch.zeros(0, self.feature_net.num_features, device=device), torch.zeros(0, dtype=torch.long, device=device), real=True)
        if not self.palette.colors:
            self.palette.colors.append(torch.zeros(0, dtype=torch.long, device=device))
            self.palette.coverage.append(torch.zeros(0, device=device))
        if self.predictions is not None and not self.predictions.labels:
            for name in ("labels", "predictions", "index"):
                getattr(self.predictions, name).append(torch.zeros(0, dtype=torch.long, device=device))
        if self.memo is not None and not self.memo.distance:
            self.memo.distance.append(torch.zeros(0, device=device))
            self.memo.nearest.append(torch.zeros(0, dtype=torch.long, device=device))
            self.memo.index.append(torch.zeros(0, dtype=torch.long, device=device))

    def compute(self) -> dict[str, Any]:
        """Every rank must call this under DDP (the metric states are gathered); returns plain floats, and per sample
        (in sample order, keys starting with "_"): the features, labels, predicted classes and nearest-image distances."""
        self._fill_empty_states()
        kid, kid_std = self.kid.compute()
        out: dict[str, Any] = {"fd": float(self.fd.compute()), "kid": float(kid), "kid_std": float(kid_std)}
        out["_features"] = _in_index_order(self.kid.fake_features, self.kid.fake_index).float().cpu()
        if self.acc is not None:
            balanced, per_class, weighted = self.acc.compute()
            out["cond_acc"] = float(balanced)
            out["cond_acc_weighted"] = float(weighted)
            out.update({f"cond_acc/{name}": float(a) for name, a in zip(self.class_names, per_class.tolist()) if a == a})
            out["_labels"], out["_predictions"] = (v.cpu() for v in self.predictions.compute())
        out.update(self.palette.compute())
        if self.memo is not None:
            distance, nearest = self.memo.compute()
            out.update(distance_summary(distance, self.threshold))
            out["_distance"], out["_nearest"] = distance.cpu(), nearest.cpu()
        return out

    def reset(self) -> None:
        for m in (self.fd, self.kid, self.acc, self.predictions, self.palette, self.memo):
            if m is not None:
                m.reset()

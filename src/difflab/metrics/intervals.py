"""How sure a quality figure is: intervals over training seeds and, for one run, over its generated images.

Over seeds: Student's t interval of the mean (and of the mean paired difference where two configurations share
seeds; Welch's interval where they do not). Over images: a percentile bootstrap that resamples the generated images
within each class (the label mix of an evaluation is fixed by design, not drawn), recomputing FD against the same
real features and the class-balanced accuracy. A bootstrap sees the sampling noise of one model only, not what
another training seed would give: a report says which one an interval rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    value: float  # the estimate: a mean over seeds, or the figure of the one run
    lo: float
    hi: float
    method: str  # "t over 3 seeds", "bootstrap over 1000 images", ...
    p: float = math.nan  # two-sided p-value of "the true value is 0" (what a difference's interval is read against)

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def half_width(self) -> float:
        """The smallest difference this interval could have told from 0 (at its level), as (hi - lo) / 2."""
        return (self.hi - self.lo) / 2


def _t_p(mean: float, se: float, df: float) -> float:
    if se == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * stats.t.sf(abs(mean) / se, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """mean +- t_{n-1} s / sqrt(n); a single value has no interval (lo = hi = nan)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2:
        return Interval(float(x.mean()) if n else math.nan, math.nan, math.nan, f"t over {n} seed")
    se = x.std(ddof=1) / math.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), f"t over {n} seeds", _t_p(x.mean(), se, n - 1))


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (unequal variances, Welch-Satterthwaite degrees of freedom)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    if va + vb == 0:
        return Interval(diff, diff, diff, f"Welch t over {len(a)} and {len(b)} seeds", _t_p(diff, 0.0, 1))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(va + vb)
    return Interval(diff, diff - half, diff + half, f"Welch t over {len(a)} and {len(b)} seeds", _t_p(diff, math.sqrt(va + vb), df))


def percentile_interval(value: float, draws: np.ndarray, level: float = 0.95, method: str = "bootstrap") -> Interval:
    """The central ``level`` of the draws, moved by the draws' bias (their median minus ``value``): a resample repeats
    images, which alone raises FD, and the shift keeps the interval around the figure it describes. p: twice the share of
    the shifted draws on the far side of 0 (the smallest level whose percentile interval reaches 0)."""
    lo, median, hi = np.quantile(draws, [0.5 - level / 2, 0.5, 0.5 + level / 2])
    bias = median - value
    shifted = np.asarray(draws, dtype=np.float64) - bias
    tail = min(np.count_nonzero(shifted <= 0), np.count_nonzero(shifted >= 0))
    return Interval(float(value), float(lo - bias), float(hi - bias), method, min(1.0, 2 * (tail + 1) / (len(shifted) + 1)))


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: the i-th smallest times (m - i + 1), made monotone, capped at 1. Rejecting
    where the adjusted p < alpha keeps the chance of any false "better"/"worse" among the m at most alpha."""
    m = len(p)
    adjusted, running = [math.nan] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def counts(index: np.ndarray, n: int) -> np.ndarray:
    """Resampled positions (k, n) -> how often each of the n items was drawn (k, n)."""
    return np.stack([np.bincount(row, minlength=n) for row in index])


class FrechetToReal:
    """FD of generated features to fixed real statistics, in float64:
    FD = |mu_g - mu_r|^2 + Tr(S_g) + Tr(S_r) - 2 Tr((S_r^1/2 S_g S_r^1/2)^1/2), with the unbiased covariance (as
    torchmetrics' FrechetInceptionDistance); S_r^1/2 is computed once, so each bootstrap draw costs one eigvalsh."""

    def __init__(self, real_mu: np.ndarray, real_sigma: np.ndarray) -> None:
        self.mu = np.asarray(real_mu, dtype=np.float64)
        sigma = np.asarray(real_sigma, dtype=np.float64)
        w, v = np.linalg.eigh(sigma)
        self.root = (v * np.sqrt(w.clip(min=0))) @ v.T
        self.trace = float(np.trace(sigma))

    def __call__(self, features: np.ndarray) -> float:
        """features (n, d) -> FD."""
        f = np.asarray(features, dtype=np.float64)
        return float(self.resampled(f, np.ones((1, len(f))))[0])

    def resampled(self, features: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """FD of k resamples of features (n, d), resample j holding feature i counts[j, i] times (rows summing to n)."""
        f, w = np.asarray(features, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        n = w.sum(1, keepdims=True)
        mu = w @ f / n
        # S = (sum_i w_i f_i f_i^T - n mu mu^T) / (n - 1)
        second = np.matmul((f[None] * w[:, :, None]).transpose(0, 2, 1), f)
        sigma = (second - n[:, :, None] * mu[:, :, None] * mu[:, None, :]) / (n[:, :, None] - 1)
        inner = np.linalg.eigvalsh(self.root @ sigma @ self.root).clip(min=0)
        return ((mu - self.mu) ** 2).sum(-1) + self.trace + np.trace(sigma, axis1=-2, axis2=-1) - 2 * np.sqrt(inner).sum(-1)


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """(..., n) -> (...,): the mean over the classes present of the share of their samples predicted as that class."""
    hits = (labels == predictions).astype(np.float64)
    classes = np.unique(labels)
    per_class = [(hits * (labels == c)).sum(-1) / (labels == c).sum(-1) for c in classes]
    return np.mean(per_class, axis=0)


def stratified_draws(strata: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, n) indices: each row resamples, with replacement, the positions of every stratum (class) within it."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws, len(strata)), dtype=np.int64)
    for value in np.unique(strata):
        where = np.flatnonzero(strata == value)
        out[:, where] = where[rng.integers(0, len(where), size=(draws, len(where)))]
    return out


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], strata: np.ndarray, draws: int = 1000, seed: int = 0,
              chunk: int = 50) -> np.ndarray:
    """``draws`` values of ``statistic(index)`` (index: (k, n) resampled positions -> (k,) values), stratified."""
    index = stratified_draws(strata, draws, seed)
    return np.concatenate([statistic(index[i : i + chunk]) for i in range(0, draws, chunk)])

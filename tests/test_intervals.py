"""Intervals of quality figures against closed forms and reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from difflab.metrics.intervals import (
    FrechetToReal,
    balanced_accuracy,
    bootstrap,
    counts,
    holm,
    percentile_interval,
    stratified_draws,
    t_interval,
    welch_interval,
)


def test_t_interval_by_hand() -> None:
    got = t_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, s = sqrt(5/3), t_{3, 0.975} = 3.18245: half width 3.18245 * 1.29099 / 2 = 2.05426
    assert got.value == 2.5 and got.lo == pytest.approx(2.5 - 2.05426, abs=1e-4) and got.hi == pytest.approx(4.55426, abs=1e-4)
    assert got.method == "t over 4 seeds" and got.excludes_zero()
    one = t_interval([3.0])
    assert one.value == 3.0 and math.isnan(one.lo) and not one.excludes_zero()


def test_welch_interval_matches_scipy() -> None:
    a, b = [1.2, 1.9, 1.5, 1.7], [2.4, 2.0, 2.9]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    got = welch_interval(a, b)
    assert got.value == pytest.approx(np.mean(a) - np.mean(b)) and got.lo == pytest.approx(ref.low) and got.hi == pytest.approx(ref.high)


def test_bootstrap_of_an_accuracy_matches_the_binomial_interval() -> None:
    """One class, n = 2000 samples of which 90% are hits: the bootstrap interval of the accuracy is the normal
    approximation of the binomial one, p +- 1.96 sqrt(p (1 - p) / n) = 0.9 +- 0.0131 (to the Monte Carlo error)."""
    n = 2000
    labels = np.zeros(n, dtype=np.int64)
    predictions = np.where(np.arange(n) < 0.9 * n, 0, 1)
    draws = bootstrap(lambda idx: balanced_accuracy(labels[idx], predictions[idx]), labels, draws=4000, seed=1)
    got = percentile_interval(0.9, draws)
    half = 1.96 * math.sqrt(0.9 * 0.1 / n)
    assert got.lo == pytest.approx(0.9 - half, abs=0.002) and got.hi == pytest.approx(0.9 + half, abs=0.002)


def test_stratified_draws_keep_every_class_count_and_stay_in_class() -> None:
    strata = np.array([0, 0, 0, 1, 2, 2])
    index = stratified_draws(strata, 50, seed=0)
    assert index.shape == (50, 6) and (strata[index] == strata).all()  # position i always draws from i's class
    assert set(index[:, 3]) == {3}  # a class of one sample: always itself


def test_balanced_accuracy_is_the_mean_over_classes() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    predictions = np.array([0, 0, 0, 1, 0, 1])
    assert balanced_accuracy(labels, predictions) == pytest.approx((3 / 4 + 1 / 2) / 2)
    # batched rows
    assert balanced_accuracy(np.stack([labels, labels]), np.stack([predictions, labels])).tolist() == pytest.approx([0.625, 1.0])


def test_frechet_to_real_equals_torchmetrics_fd() -> None:
    from difflab.metrics.scores import frechet_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(300, 8, generator=g, dtype=torch.float64) * 1.3 + 0.2
    fd = frechet_distance(8, sync=False)
    fd.update(real, real=True)
    fd.update(fake, real=False)
    ours = FrechetToReal(real.mean(0).numpy(), np.cov(real.numpy(), rowvar=False))
    assert ours(fake.numpy()) == pytest.approx(float(fd.compute()), rel=1e-9)
    assert ours(real.numpy()) == pytest.approx(0.0, abs=1e-9)
    # a resample is the same as the repeated features themselves
    idx = np.random.default_rng(0).integers(0, 300, size=(3, 300))
    by_counts = ours.resampled(fake.numpy(), counts(idx, 300))
    assert by_counts == pytest.approx([ours(fake.numpy()[i]) for i in idx], rel=1e-9)


def test_p_values_match_scipys_t_tests() -> None:
    a, b = [1.2, 1.9, 1.5, 1.7], [2.4, 2.0, 2.9]
    assert t_interval(a).p == pytest.approx(stats.ttest_1samp(a, 0).pvalue)
    assert welch_interval(a, b).p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert t_interval([1.0, 1.0, 1.0]).p == 0.0 and t_interval([0.0, 0.0]).p == 1.0  # no spread: certain, or nothing
    # a 95% interval excludes 0 exactly when p < 0.05
    for values in ([0.1, 0.3, 0.2], [0.1, -0.3, 0.25], [0.5, 0.52, 0.49, 0.9]):
        got = t_interval(values)
        assert got.excludes_zero() == (got.p < 0.05)


def test_bootstrap_p_value_is_the_share_of_draws_past_zero() -> None:
    draws = np.concatenate([np.full(30, -1.0), np.full(970, 1.0)])  # median 1: no shift
    got = percentile_interval(1.0, draws)
    assert got.p == pytest.approx(2 * 31 / 1001) and got.half_width == pytest.approx((got.hi - got.lo) / 2)


def test_holm_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == [] and holm([0.02]) == [0.02]

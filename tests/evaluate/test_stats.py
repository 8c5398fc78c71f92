"""pelmark.evaluate.stats: cluster bootstrap, paired comparisons, robust figures (synthetic data with known answers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pelmark.evaluate.stats import (
    Resampling,
    ResampleUnit,
    bootstrap_p_value,
    bootstrap_proportion,
    bootstrap_rmse,
    paired_difference,
    resampling,
    robust_figures,
)


def _clustered(rng: np.random.Generator, n_clusters: int, n_landmarks: int = 1):
    """Squared errors of clusters of 2-6 images: cluster c has mean d² m_c ~ Gamma(2, 5) (mean 10), d² = m_c Exp(1).

    The population RMSE is sqrt(E[d²]) = sqrt(10) whatever the cluster sizes (they are independent of m_c).
    """
    sizes = rng.integers(2, 7, size=n_clusters)
    means = rng.gamma(2.0, 5.0, size=(n_clusters, n_landmarks))
    squared = np.concatenate([means[c] * rng.exponential(1.0, size=(sizes[c], n_landmarks)) for c in range(n_clusters)])
    subjects = np.repeat([f"s{c}" for c in range(n_clusters)], sizes)
    return squared, subjects


# ---------------------------------------------------------------- resampling


def test_resampling_draws_subjects_with_replacement_and_is_reproducible():
    subjects = np.array(["b", "a", "b", "c", "a", "b"], dtype=object)
    draws = resampling(subjects, 500, np.random.default_rng(7))
    assert draws.unit is ResampleUnit.SUBJECTS and draws.n_subjects == 3 and draws.n_images == 6
    np.testing.assert_array_equal(draws.cluster_of_image, [1, 0, 1, 2, 0, 1])  # sorted ids: a=0, b=1, c=2
    assert draws.weights.shape == (500, 3) and (draws.weights.sum(1) == 3).all()
    assert (draws.weights == 3).any() and (draws.weights == 0).any()  # with replacement
    again = resampling(subjects, 500, np.random.default_rng(7))
    np.testing.assert_array_equal(draws.weights, again.weights)


def test_one_subject_falls_back_to_resampling_images():
    draws = resampling(np.array(["only"] * 5, dtype=object), 100, np.random.default_rng(0))
    assert draws.unit is ResampleUnit.IMAGES and draws.n_subjects == 1
    np.testing.assert_array_equal(draws.cluster_of_image, np.arange(5))
    assert draws.weights.shape == (100, 5) and (draws.weights.sum(1) == 5).all()
    cells = bootstrap_rmse(np.array([[1.0], [4.0], [9.0], [16.0], [25.0]]), draws)
    assert cells.unit is ResampleUnit.IMAGES and cells.mean.lo < cells.mean.value < cells.mean.hi


# ---------------------------------------------------------------- intervals


def test_observed_cells_are_table1s_and_mean_is_over_landmarks():
    # Two subjects; L2 is invisible in subject b (NaN) and L3 never visible.
    squared = np.array([[1.0, 4.0, np.nan], [9.0, 16.0, np.nan], [25.0, np.nan, np.nan]])
    cells = bootstrap_rmse(squared, resampling(np.array(["a", "a", "b"]), 200, np.random.default_rng(0)))
    # L1: sqrt((1 + 9 + 25) / 3); L2: sqrt((4 + 16) / 2) = sqrt(10); Mean over the two defined landmarks.
    assert cells.landmarks[0].value == pytest.approx(math.sqrt(35 / 3))
    assert cells.landmarks[1].value == pytest.approx(math.sqrt(10))
    assert math.isnan(cells.landmarks[2].value) and math.isnan(cells.landmarks[2].lo)
    assert cells.mean.value == pytest.approx((math.sqrt(35 / 3) + math.sqrt(10)) / 2)
    # Resamples that draw only b leave L2 undefined; its interval comes from the others: subject a's alone.
    assert cells.landmarks[1].lo == pytest.approx(math.sqrt(10)) and cells.landmarks[1].hi == pytest.approx(math.sqrt(10))


def test_interval_width_matches_the_analytic_standard_error():
    # 60 subjects, each with 3 images of identical d² = m_c: RMSE = sqrt(mean m). Delta method:
    # SE = sd(m) / sqrt(C) / (2 sqrt(mean m)) (sd with ddof 0, as the bootstrap's plug-in); width ~ 2 x 1.96 SE.
    rng = np.random.default_rng(11)
    means = rng.gamma(2.0, 5.0, size=60)
    squared = np.repeat(means, 3)[:, None]
    subjects = np.repeat(np.arange(60), 3).astype(str)
    cells = bootstrap_rmse(squared, resampling(subjects, 4000, np.random.default_rng(1)))
    se = means.std() / math.sqrt(60) / (2 * math.sqrt(means.mean()))
    assert cells.mean.value == pytest.approx(math.sqrt(means.mean()))
    assert (cells.mean.hi - cells.mean.lo) / (2 * 1.959964 * se) == pytest.approx(1.0, abs=0.12)


def test_subjects_are_the_unit_not_images():
    # The same 30 subjects with one image each, or with 4 identical images each: the same interval
    # (the copies add no information). Treating the 120 images as independent shrinks it by about 2 = sqrt(4).
    rng = np.random.default_rng(5)
    means = rng.gamma(2.0, 5.0, size=30)
    one = bootstrap_rmse(means[:, None], resampling(np.arange(30).astype(str), 2000, np.random.default_rng(3)))
    four_subjects = np.repeat(np.arange(30), 4).astype(str)
    four = bootstrap_rmse(np.repeat(means, 4)[:, None], resampling(four_subjects, 2000, np.random.default_rng(3)))
    assert (four.mean.lo, four.mean.hi) == pytest.approx((one.mean.lo, one.mean.hi))
    image_draws = resampling(np.arange(120).astype(str), 2000, np.random.default_rng(3))
    as_images = bootstrap_rmse(np.repeat(means, 4)[:, None], image_draws)
    ratio = (four.mean.hi - four.mean.lo) / (as_images.mean.hi - as_images.mean.lo)
    assert ratio == pytest.approx(2.0, abs=0.3)


def test_intervals_cover_the_true_rmse():
    # 300 cohorts of 40 subjects drawn from a population with RMSE sqrt(10): a 95 % interval should
    # contain it about 95 % of the time (percentile intervals run a little short with 40 clusters).
    rng = np.random.default_rng(2024)
    covered = []
    for _ in range(300):
        squared, subjects = _clustered(rng, 40)
        cells = bootstrap_rmse(squared, resampling(subjects, 1000, rng))
        covered.append(cells.mean.lo <= math.sqrt(10.0) <= cells.mean.hi)
    assert 0.88 <= np.mean(covered) <= 0.99


# ---------------------------------------------------------------- paired comparisons


@pytest.mark.parametrize("scale", [1.1, 0.8])
def test_paired_difference_of_scaled_errors(scale):
    # Every error times `scale`: every RMSE_l (hence Mean, in every resample) times `scale`, so the
    # difference is exactly (scale - 1) Mean, of one sign in every resample: p = 2 / (B + 1).
    squared, subjects = _clustered(np.random.default_rng(9), 25, n_landmarks=3)
    draws = resampling(subjects, 1999, np.random.default_rng(4))
    result = paired_difference(squared, squared * scale**2, draws)
    base_interval = bootstrap_rmse(squared, draws).mean
    base = base_interval.value
    assert result.baseline_mean == pytest.approx(base)
    assert result.difference.value == pytest.approx((scale - 1) * base)
    assert result.relative_pct == pytest.approx(100 * (scale - 1))
    assert result.difference.lo <= result.difference.value <= result.difference.hi
    assert (result.difference.lo > 0) if scale > 1 else (result.difference.hi < 0)
    assert result.p_value == pytest.approx(2 / 2000)
    # The paired interval is that of (scale - 1) x the baseline's Mean (same resamples).
    lo, hi = sorted([(scale - 1) * base_interval.lo, (scale - 1) * base_interval.hi])
    assert (result.difference.lo, result.difference.hi) == pytest.approx((lo, hi))


def test_paired_difference_of_identical_models_is_zero_with_p_one():
    squared, subjects = _clustered(np.random.default_rng(1), 10, n_landmarks=2)
    result = paired_difference(squared, squared.copy(), resampling(subjects, 500, np.random.default_rng(0)))
    assert result.difference.value == 0.0 and result.difference.lo == 0.0 and result.difference.hi == 0.0
    assert result.relative_pct == 0.0 and result.p_value == 1.0


def test_paired_difference_detects_a_small_shift_that_unpaired_intervals_hide():
    # Errors shared across models vary a lot between subjects; one model is 0.3 px worse on every image.
    rng = np.random.default_rng(3)
    errors = rng.gamma(2.0, 3.0, size=(60, 1)) * np.repeat(rng.gamma(2.0, 1.0, size=20), 3)[:, None]
    subjects = np.repeat(np.arange(20), 3).astype(str)
    draws = resampling(subjects, 2000, np.random.default_rng(8))
    result = paired_difference(errors**2, (errors + 0.3) ** 2, draws)
    base, other = bootstrap_rmse(errors**2, draws).mean, bootstrap_rmse((errors + 0.3) ** 2, draws).mean
    assert other.lo < base.hi  # the two rows' intervals overlap ...
    assert result.difference.lo > 0 and result.p_value < 0.01  # ... but the paired difference is clear


def test_p_value_by_hand():
    # Resampled differences -1, 1, 2, 3: 1 + 1 at or below 0, 1 + 3 at or above: p = 2 x 2 / 5.
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)
    assert bootstrap_p_value(np.zeros(9)) == 1.0


# ---------------------------------------------------------------- robust figures


def test_robust_figures_by_hand():
    errors = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 10.0], [20.0, np.nan, np.nan]])
    figures = robust_figures(errors)
    # Six defined errors 1, 2, 3, 4, 10, 20: median 3.5; 90th percentile at rank 4.5 -> 10 + 0.5 x 10 = 15.
    assert figures["n"] == 6 and figures["median"] == pytest.approx(3.5) and figures["p90"] == pytest.approx(15.0)
    assert figures["within_2px"] == pytest.approx(2 / 6)
    assert figures["within_5px"] == pytest.approx(4 / 6)
    assert figures["within_10px"] == pytest.approx(5 / 6)
    empty = robust_figures(np.full((2, 2), np.nan))
    assert empty["n"] == 0 and math.isnan(empty["median"]) and math.isnan(empty["within_5px"])


# ---------------------------------------------------------------- proportions (visibility accuracy)


def test_proportion_pools_every_image_and_landmark_and_resamples_subjects():
    # Subject a: 2 images x 2 landmarks, 4 of 4 right; subject b: 1 image, 0 of 2 right. Pooled 4 / 6.
    hits = np.array([[True, True], [True, True], [False, False]])
    subjects = np.array(["a", "a", "b"])
    draws = resampling(subjects, 500, np.random.default_rng(0))
    interval = bootstrap_proportion(hits, draws)
    assert interval.value == pytest.approx(4 / 6)
    # A resample holds a twice (1), b twice (0) or one of each (4 / 6): the interval spans [0, 1].
    assert interval.lo == pytest.approx(0.0) and interval.hi == pytest.approx(1.0)
    # By hand: the draw (a, a) gives 8 / 8 and (a, b) gives 4 / 6.
    hand = Resampling(draws.unit, draws.cluster_of_image, np.array([[2.0, 0.0], [1.0, 1.0]]), 2)
    assert bootstrap_proportion(hits, hand).lo == pytest.approx(4 / 6 + (1 - 4 / 6) * 0.025)


def test_proportion_of_a_split_where_every_call_is_right_has_no_spread():
    draws = resampling(np.array(["a", "b", "c"]), 200, np.random.default_rng(1))
    interval = bootstrap_proportion(np.ones((3, 4), dtype=bool), draws)
    assert (interval.value, interval.lo, interval.hi) == (1.0, 1.0, 1.0)

"""Statistics of Table 1: cluster-bootstrap intervals, paired comparisons, robust error figures.

Everything here is numpy on per-image squared errors; no model, no file.

Resampling unit
    The views of one CT are not independent (one anatomy, one set of landmark
    positions), so the bootstrap resamples subjects, not images: a resample
    draws as many subjects as the split has, with replacement, and pools all
    the images of the drawn subjects (a subject drawn twice counts twice).
    RMSE_l = sqrt(mean of d² over the pooled images where l is visible) and
    Mean = the mean of the defined RMSE_l, as in Table 1. A split with a
    single subject (a small cohort's novel_subject) has no spread between
    subjects to measure: it falls back to resampling images, which ignores the
    correlation between views and gives too narrow an interval; the unit used
    is recorded with every interval. With few subjects (2-5) the subject
    bootstrap is coarse too: read those intervals as rough.
Intervals
    Percentile intervals: the 2.5th and 97.5th percentiles of the resampled
    statistic (numpy's linear interpolation). A landmark that is not visible
    in any drawn subject is undefined in that resample and left out of its
    percentiles and of that resample's Mean.
Paired comparison
    Both predictors are resampled with the same weights (the same drawn
    subjects, images matched by store row), so the interval of the
    difference ``Mean(other) - Mean(baseline)`` keeps the pairing.
    The two-sided p-value is ``min(1, 2 min(1 + #{Δ_b <= 0}, 1 + #{Δ_b >= 0}) / (B + 1))``
    over the B resampled differences Δ_b: twice the smaller tail, with the
    +1 correction so that it is never 0. Identical predictors give Δ_b = 0
    in every resample and p = 1.
Robust figures
    RMSE is driven by a few gross errors; the median, the 90th percentile and
    the share of visible landmarks within 2, 5 and 10 px describe the bulk.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

DEFAULT_RESAMPLES = 2000
CONFIDENCE = 0.95
WITHIN_PX: tuple[float, ...] = (2.0, 5.0, 10.0)


class ResampleUnit(str, enum.Enum):
    """What one bootstrap draw picks."""

    SUBJECTS = "subjects"  # the cluster bootstrap
    IMAGES = "images"  # fallback for a split with a single subject


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic and its percentile interval (NaN where undefined)."""

    value: float
    lo: float
    hi: float


@dataclasses.dataclass(frozen=True)
class Resampling:
    """The bootstrap draws of one split, shared by every predictor on it.

    Attributes:
        unit: subjects (clusters) or images.
        cluster_of_image: (N,) index of each image's resampling unit.
        weights: (B, C) how many times each unit was drawn in each resample.
        n_subjects: subjects in the split.
    """

    unit: ResampleUnit
    cluster_of_image: np.ndarray
    weights: np.ndarray
    n_subjects: int

    @property
    def n_resamples(self) -> int:
        return self.weights.shape[0]

    @property
    def n_images(self) -> int:
        return len(self.cluster_of_image)


@dataclasses.dataclass(frozen=True)
class RmseIntervals:
    """Table-1 cells of one predictor with their intervals.

    Attributes:
        mean: the Mean column.
        landmarks: one per landmark column.
        unit: the resampling unit behind the intervals.
        n_subjects, n_images: size of the split.
    """

    mean: Interval
    landmarks: tuple[Interval, ...]
    unit: ResampleUnit
    n_subjects: int
    n_images: int


@dataclasses.dataclass(frozen=True)
class Difference:
    """A paired comparison of Mean RMSE: other minus baseline.

    Attributes:
        baseline_mean, other_mean: the two Means.
        difference: the observed difference with its paired percentile interval.
        relative_pct: the difference in % of the baseline's Mean.
        p_value: two-sided paired-bootstrap p-value (see the module docstring).
        unit: the resampling unit.
    """

    baseline_mean: float
    other_mean: float
    difference: Interval
    relative_pct: float
    p_value: float
    unit: ResampleUnit


def resampling(subject_ids: np.ndarray, n_resamples: int, generator: np.random.Generator) -> Resampling:
    """Draw the bootstrap resamples of a split: subjects with replacement, or images if it has one subject.

    Args:
        subject_ids: (N,) subject of each image.
        n_resamples: B.
        generator: the source of the draws.
    """
    if n_resamples < 1:
        raise ValueError(f"need at least one resample, got {n_resamples}")
    subjects, cluster_of_image = np.unique(np.asarray(subject_ids).astype(str), return_inverse=True)
    unit = ResampleUnit.SUBJECTS
    if len(subjects) < 2:
        unit, cluster_of_image = ResampleUnit.IMAGES, np.arange(len(cluster_of_image))
    if len(cluster_of_image) == 0:
        raise ValueError("cannot resample a split without images")
    n_units = int(cluster_of_image.max()) + 1
    # Multinomial counts: the same distribution as drawing n_units units with replacement.
    weights = generator.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_resamples)
    return Resampling(unit, cluster_of_image.reshape(-1), weights.astype(np.float64), len(subjects))


def cluster_sums(squared_errors: np.ndarray, cluster_of_image: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of d² and counts of the defined entries.

    Args:
        squared_errors: (N, L) d², NaN where a landmark does not count (not visible).
        cluster_of_image: (N,) cluster index of each image.
        n_clusters: C.

    Returns:
        (C, L) sums and (C, L) counts.
    """
    squared = np.asarray(squared_errors, dtype=np.float64)
    defined = np.isfinite(squared)
    sums = np.zeros((n_clusters, squared.shape[1]))
    counts = np.zeros((n_clusters, squared.shape[1]))
    np.add.at(sums, cluster_of_image, np.where(defined, squared, 0.0))
    np.add.at(counts, cluster_of_image, defined.astype(np.float64))
    return sums, counts


def landmark_rmse_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(..., L) RMSE per landmark from pooled sums and counts; NaN where the count is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.sqrt(sums / np.maximum(counts, 1e-300)), np.nan)


def mean_over_landmarks(rmse: np.ndarray) -> np.ndarray:
    """(...) Table 1's Mean: mean of the defined landmark RMSEs (NaN if none is)."""
    defined = np.isfinite(rmse)
    n = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(defined, rmse, 0.0).sum(-1) / np.maximum(n, 1), np.nan)


def resampled_rmse(squared_errors: np.ndarray, draws: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """The observed and resampled per-landmark RMSE.

    Returns:
        (L,) observed RMSE and (B, L) RMSE of each resample.
    """
    n_clusters = draws.weights.shape[1]
    sums, counts = cluster_sums(squared_errors, draws.cluster_of_image, n_clusters)
    observed = landmark_rmse_from_sums(sums.sum(0), counts.sum(0))
    return observed, landmark_rmse_from_sums(draws.weights @ sums, draws.weights @ counts)


def percentile_interval(value: float, samples: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """``value`` with the percentile interval of its defined bootstrap ``samples``."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(value) or len(samples) == 0:
        return Interval(float(value), float("nan"), float("nan"))
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return Interval(float(value), float(lo), float(hi))


def bootstrap_rmse(squared_errors: np.ndarray, draws: Resampling) -> RmseIntervals:
    """Table-1 cells (each landmark and the Mean) of one predictor with their 95 % intervals.

    Args:
        squared_errors: (N, L) d² in the table's unit, NaN where not visible.
        draws: the split's resamples (:func:`resampling`).
    """
    observed, resampled = resampled_rmse(squared_errors, draws)
    landmarks = tuple(percentile_interval(observed[l], resampled[:, l]) for l in range(len(observed)))
    mean = percentile_interval(float(mean_over_landmarks(observed)), mean_over_landmarks(resampled))
    return RmseIntervals(mean, landmarks, draws.unit, draws.n_subjects, draws.n_images)


def resampled_mean(values: np.ndarray, draws: Resampling) -> tuple[float, np.ndarray]:
    """The mean of ``values`` (N, L), pooled over every image and landmark, and its (B,) resampled means
    (the split's resamples: the same clusters as Table 1's intervals). NaN for an empty array."""
    values = np.asarray(values, dtype=np.float64)
    n_clusters = draws.weights.shape[1]
    sums = np.zeros(n_clusters)
    counts = np.zeros(n_clusters)
    np.add.at(sums, draws.cluster_of_image, values.sum(1))
    np.add.at(counts, draws.cluster_of_image, float(values.shape[1]))
    if counts.sum() == 0:
        return float("nan"), np.full(draws.n_resamples, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(sums.sum() / counts.sum()), (draws.weights @ sums) / (draws.weights @ counts)


def bootstrap_proportion(hits: np.ndarray, draws: Resampling) -> Interval:
    """The share of true entries of ``hits`` (N, L) bool, pooled over every image and landmark, with its
    95 % interval over the split's resamples (:func:`resampled_mean`)."""
    return percentile_interval(*resampled_mean(hits, draws))


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value from resampled differences: twice the smaller tail, +1 corrected (module docstring)."""
    differences = np.asarray(differences, dtype=np.float64)
    differences = differences[np.isfinite(differences)]
    if len(differences) == 0:
        return float("nan")
    below = 1 + int((differences <= 0).sum())
    above = 1 + int((differences >= 0).sum())
    return min(1.0, 2.0 * min(below, above) / (len(differences) + 1))


def paired_difference(squared_baseline: np.ndarray, squared_other: np.ndarray, draws: Resampling) -> Difference:
    """Mean RMSE of ``other`` minus the baseline's, with a paired interval and p-value.

    Args:
        squared_baseline, squared_other: (N, L) d² of the same images in the
            same order (matched by store row), NaN where not visible.
        draws: the split's resamples; both predictors use the same ones.
    """
    if np.shape(squared_baseline) != np.shape(squared_other):
        raise ValueError("paired predictors need the same images and landmarks")
    base_observed, base_resampled = resampled_rmse(squared_baseline, draws)
    other_observed, other_resampled = resampled_rmse(squared_other, draws)
    base_mean = float(mean_over_landmarks(base_observed))
    other_mean = float(mean_over_landmarks(other_observed))
    observed = other_mean - base_mean
    resampled = mean_over_landmarks(other_resampled) - mean_over_landmarks(base_resampled)
    relative = 100.0 * observed / base_mean if base_mean != 0 else float("nan")
    return Difference(
        base_mean, other_mean, percentile_interval(observed, resampled), relative, bootstrap_p_value(resampled), draws.unit
    )


def robust_figures(errors: np.ndarray, within_px: tuple[float, ...] = WITHIN_PX) -> dict[str, float]:
    """Median, 90th percentile and shares within thresholds of the defined errors.

    Args:
        errors: errors of any shape (px), NaN where a landmark does not count.
        within_px: thresholds of the ``within_<t>px`` shares (fractions, 0-1).

    Returns:
        ``n``, ``median``, ``p90`` and ``within_<t>px`` per threshold (NaN if no error is defined).
    """
    values = np.asarray(errors, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    figures: dict[str, float] = {"n": float(len(values))}
    empty = len(values) == 0
    figures["median"] = float("nan") if empty else float(np.median(values))
    figures["p90"] = float("nan") if empty else float(np.percentile(values, 90.0))
    for threshold in within_px:
        figures[within_key(threshold)] = float("nan") if empty else float((values <= threshold).mean())
    return figures


def within_key(threshold_px: float) -> str:
    """Column name of a share within a threshold, e.g. ``within_5px``."""
    return f"within_{threshold_px:g}px"

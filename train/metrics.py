"""Landmark RMSE as the paper's Table 1 reports it.

For landmark l over the images where it is visible, RMSE_l = sqrt(mean_i d_il²),
d the Euclidean distance in pixels between the predicted and the true point.
The table's "Mean" is the mean of the per-landmark RMSEs (Table 1's Mean
column is the average of its L1-L8 columns, e.g. 8.58 for the baseline's
novel-view row).
"""

from __future__ import annotations

import numpy as np


def landmark_rmse(predicted: np.ndarray, true: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(L,) RMSE per landmark over the visible entries; NaN for a landmark never visible.

    Args:
        predicted, true: (N, L, 2) points.
        visible: (N, L) bool.
    """
    squared = np.square(np.asarray(predicted, np.float64) - np.asarray(true, np.float64)).sum(-1)
    visible = np.asarray(visible, bool)
    counts = visible.sum(0)
    sums = np.where(visible, squared, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.sqrt(sums / np.maximum(counts, 1)), np.nan)


def mean_rmse(per_landmark: np.ndarray) -> float:
    """Table 1's Mean: the mean of the per-landmark RMSEs that are defined."""
    values = np.asarray(per_landmark, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")

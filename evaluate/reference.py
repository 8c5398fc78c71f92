"""The mean-position reference predictor: what a model would score by learning only the average.

It always predicts each landmark at its mean visible position over the
store's training images, in detector pixels, mapped to the model camera of
the size being compared. Its row in Table 1 tells a reader how much of a
model's accuracy comes from the images rather than from where landmarks
usually lie. A store without training images (e.g. real X-rays) has no
reference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pelmark.evaluate.predict import Predictions, SplitTruth
from pelmark.store import Split, StoreReader

REFERENCE_NAME = "mean-position"


@dataclasses.dataclass(frozen=True, eq=False)
class MeanPosition:
    """The reference's fit.

    Attributes:
        mean_detector_px: (L, 2) mean visible position of each landmark in
            store detector px; NaN for a landmark never visible.
        train_images: training images it was fitted on.
        visible_counts: (L,) images in which each landmark was visible.
    """

    mean_detector_px: np.ndarray
    train_images: int
    visible_counts: np.ndarray


def mean_positions(points_px: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(L, 2) mean of each landmark's visible points; NaN where a landmark is never visible.

    Args:
        points_px: (N, L, 2) points.
        visible: (N, L) bool.
    """
    points = np.asarray(points_px, dtype=np.float64)
    weights = np.asarray(visible, dtype=bool)[..., None]
    counts = weights.sum(0)
    sums = np.where(weights, points, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def fit_mean_position(store_path: Path) -> MeanPosition | None:
    """Fit the reference on the store's train split; None when the store has no training images."""
    reader = StoreReader(store_path)
    group = reader.group
    rows = reader.rows(Split.TRAIN)
    if len(rows) == 0:
        return None
    points = np.asarray(group["landmarks_2d"][:], dtype=np.float64)[rows]
    visible = np.asarray(group["visible"][:], dtype=bool)[rows]
    return MeanPosition(mean_positions(points, visible), len(rows), visible.sum(0))


def predict_mean_position(reference: MeanPosition, truth: SplitTruth, name: str = REFERENCE_NAME) -> Predictions:
    """The reference's predictions for every image of ``truth``, in its model px."""
    import torch

    mean_model_px = truth.store_camera.pixels_to(truth.model_camera, torch.from_numpy(reference.mean_detector_px)).numpy()
    predicted = np.broadcast_to(mean_model_px, truth.true_px.shape).copy()
    return Predictions(model=name, truth=truth, predicted_px=predicted)

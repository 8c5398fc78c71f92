"""Registration-consistent landmarks (``pelmark eval --refine``), beyond the paper.

For each image, the landmarks the model finds (:meth:`Predictions.votes`:
heatmap peak probability >= 0.5, the BCE-trained model's own decision, the
argmax inside the image, and for a model with a visibility output the argmax
on the landmark's own bone; for a model with a canvas margin also its found
peaks in the margin, outside the image) are registered to the image's CT landmarks with
the robust layer (RANSAC over subsets, then LM on the inliers). This is the
"robust" registration of :mod:`pelmark.evaluate.pose`, reused, not run again.
All the CT's landmarks are then projected under that pose into the model
camera with :func:`pelmark.geometry.project`: landmarks the model missed get
a position, and outliers are replaced by where the anatomy puts them.

An image whose registration is degenerate (fewer than 4 found landmarks,
collinear points, ...) keeps the raw argmax of every landmark and is counted
as a failure. So does one that is *unconfirmed*: its pose has no more inliers
than the minimal subset it was fitted through (4), so no landmark outside
that subset agrees with it. Four points fit some pose within RANSAC's 10 px
almost regardless of where they are (8 equations, 6 unknowns); on the demo
cohort such a pose, fitted to four clustered pubic detections, one of them
46 px off, projected an ASIS 758 px away (seed 44's fine-tune, novel
subjects: +reg 18.80 px against 11.82 raw; 11.39 with the rule). The
refined predictor is named ``<run>+reg``; its RMSE is over the same visible
landmarks as the raw run's, so the two rows compare.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from pelmark.evaluate.pose import PoseErrors, Registration
from pelmark.evaluate.predict import FOUND_PROBABILITY, Predictions
from pelmark.geometry import project
from pelmark.registration.robust import MIN_INLIERS, unconfirmed

REFINED_SUFFIX = "+reg"


class RefineFlag:
    """Values of ``per_image.csv``'s ``refine_flag`` for a refined landmark (joined by ``|``; empty: found and kept)."""

    NOT_FOUND = "not_found"  # it did not vote (not found, or off its bone): its point comes from the pose alone
    OUTLIER = "outlier"  # found, but rejected by RANSAC
    OUTSIDE = "outside"  # its refined point lies outside the image
    FAILED = "failed"  # the image's registration failed: the raw argmax is kept
    UNCONFIRMED = "unconfirmed"  # its pose has no inlier beyond the minimal subset: the raw argmax is kept


@dataclasses.dataclass(frozen=True, eq=False)
class Refinement:
    """A run's refined predictions on one split and what happened to each landmark.

    Attributes:
        predictions: the ``<run>+reg`` predictor (same truth, the raw peak probabilities).
        found: (N, L) landmarks that voted (:meth:`Predictions.votes`: the detector found them and, for a
            model with a visibility output, placed them on their own bone).
        inliers: (N, L) found landmarks the registration kept.
        outside: (N, L) refined point outside the model image.
        failed: (N,) registration degenerate: the image keeps the raw argmax.
        unconfirmed: (N,) registration not degenerate but with no more inliers than the minimal
            subset (:data:`MIN_INLIERS` - 1): the image keeps the raw argmax too.
    """

    predictions: Predictions
    found: np.ndarray
    inliers: np.ndarray
    outside: np.ndarray
    failed: np.ndarray
    unconfirmed: np.ndarray

    @property
    def kept_raw(self) -> np.ndarray:
        """(N,) images that keep the raw argmax: their registration failed or is unconfirmed."""
        return self.failed | self.unconfirmed

    def flags(self, image: int, landmark: int) -> str:
        """The ``refine_flag`` of one landmark (see :class:`RefineFlag`)."""
        if self.failed[image]:
            return RefineFlag.FAILED
        if self.unconfirmed[image]:
            return RefineFlag.UNCONFIRMED
        flags = []
        if not self.found[image, landmark]:
            flags.append(RefineFlag.NOT_FOUND)
        elif not self.inliers[image, landmark]:
            flags.append(RefineFlag.OUTLIER)
        if self.outside[image, landmark]:
            flags.append(RefineFlag.OUTSIDE)
        return "|".join(flags)

    def counts(self) -> dict[str, Any]:
        """Images, failed registrations and landmark counts, for ``summary.json``."""
        kept = ~self.kept_raw[:, None]
        return {
            "images": int(len(self.failed)),
            "registration_failed": int(self.failed.sum()),
            "registration_unconfirmed": int(self.unconfirmed.sum()),
            "landmarks": int(self.found.size),
            "not_found": int((~self.found & kept).sum()),
            "outliers": int((self.found & ~self.inliers & kept).sum()),
            "outside": int((self.outside & kept).sum()),
        }


def refine(predictions: Predictions, robust: PoseErrors) -> Refinement:
    """The ``<run>+reg`` predictor from a run's predictions and their robust registration.

    Args:
        predictions: the run's raw argmax predictions on one split.
        robust: :func:`pelmark.evaluate.pose.pose_metrics` of ``predictions``
            with :attr:`Registration.ROBUST` (its poses and inliers are used).

    Raises:
        ValueError: ``robust`` is not a robust registration of these images.
    """
    truth = predictions.truth
    if robust.registration is not Registration.ROBUST or robust.pose is None or len(robust.pose) != truth.n_images:
        raise ValueError("refine needs the robust registration of the same images, with its poses")
    pose = torch.from_numpy(np.asarray(robust.pose, dtype=np.float64))
    points = torch.from_numpy(np.asarray(truth.landmarks_3d, dtype=np.float64))
    with torch.no_grad():
        projected = project(points, pose, truth.model_camera)
        inside = truth.model_camera.contains(projected).numpy()
    failed = np.asarray(robust.degenerate, dtype=bool)
    found = predictions.votes()
    inliers = np.asarray(robust.inliers, dtype=bool) & found
    not_confirmed = unconfirmed(failed, inliers)
    keep_raw = failed | not_confirmed
    refined = np.where(keep_raw[:, None, None], predictions.predicted_px, projected.numpy())
    outside = ~inside & ~keep_raw[:, None]
    name = predictions.model + REFINED_SUFFIX
    refined_predictions = Predictions(name, truth, refined, predictions.peak_probability)
    return Refinement(refined_predictions, found, inliers, outside, failed, not_confirmed)


def failure_notes(refinements: list[Refinement]) -> tuple[str, ...]:
    """A note for each refined predictor with failed registrations."""
    notes = []
    for refinement in refinements:
        n_failed, n_unconfirmed = int(refinement.failed.sum()), int(refinement.unconfirmed.sum())
        if n_failed or n_unconfirmed:
            truth = refinement.predictions.truth
            notes.append(
                f"{refinement.predictions.model} {truth.split.label}: registration failed on {n_failed} and was "
                f"unconfirmed (under {MIN_INLIERS} inliers) on {n_unconfirmed} of {truth.n_images} images; "
                "they keep the raw argmax"
            )
    return tuple(notes)


def refine_summary(refinements: list[Refinement], enabled: bool) -> dict[str, Any]:
    """The ``refine`` section of ``summary.json``: the method and each refined predictor's counts."""
    return {
        "enabled": enabled,
        "rows": f"<run>{REFINED_SUFFIX}",
        "found": (
            f"heatmap peak sigmoid >= {FOUND_PROBABILITY} and argmax inside the image (fixed, not tuned), and for a model "
            "with a visibility output on its own bone; a canvas-margin model's found peaks outside the image vote too"
        ),
        "registration": "pose.csv's robust registration (RANSAC over subsets of the found landmarks, then lm on the inliers)",
        "prediction": "every CT landmark projected into the model camera under that pose (pelmark.geometry.project)",
        "fallback": (
            "a degenerate registration keeps the image's raw argmax and counts as registration_failed; one with fewer "
            f"than {MIN_INLIERS} inliers (none beyond the minimal subset) keeps it too and counts as registration_unconfirmed"
        ),
        "metric": "RMSE over the same visible landmarks as the raw run's row",
        "results": [
            {"split": r.predictions.truth.split.label, "model": r.predictions.model, **r.counts()} for r in refinements
        ],
    }

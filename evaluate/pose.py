"""Pose metrics: register predicted landmarks to the CT's 3D landmarks and compare with the true pose.

The predicted landmarks (model px) are mapped to the store's detector pixels
and registered with :func:`pelmark.registration.register` (``lm``, "plain")
and :func:`pelmark.registration.register_robust` (RANSAC, then lm on the
inliers: "robust"). In the plain registration the landmarks visible in the
ground truth take part (weight 1; the others weight 0), as for the landmark
errors. In the robust one, the landmarks the model itself finds vote
(:meth:`Predictions.votes`: heatmap peak probability >= 0.5 and argmax in the
image, and for a model with a visibility output, on its own bone; a model with
a canvas margin also votes with its found peaks in the margin), so that its
pose uses no ground truth; it is also the pose behind
``pelmark eval --refine`` (:mod:`pelmark.evaluate.refine`). A predictor
without heatmaps (the mean-position reference) votes with its visible landmarks.

Per image:
    rotation error
        geodesic angle between the estimated and true rotations, degrees.
    translation error
        distance between the estimated and true translations, mm.
    mTRE
        mean over all the CT's landmarks of ``|T_est p - T_true p|`` in mm,
        with ``T`` the patient motion of :func:`pelmark.geometry.transform_points`.
    success
        mTRE below a threshold of :data:`SUCCESS_THRESHOLDS_MM` and a
        registration that is not degenerate (fewer than the minimum of visible
        landmarks, collinear points, points behind the source, ...).

Summaries give mean and median errors over the images whose registration is
not degenerate (a degenerate one keeps its start pose, which says nothing
about the landmarks), the number of degenerate images, and success rates over
all images (a degenerate registration is a failure).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np
import torch

from pelmark.evaluate.units import model_to_detector_px
from pelmark.evaluate.predict import Predictions
from pelmark.geometry import Camera
from pelmark.registration import target_registration_errors

# mTRE thresholds (mm) of the success rates. 10 mm is the usual bar for a
# usable 2D/3D initialisation of intensity-based registration; 5 mm a tight one.
SUCCESS_THRESHOLDS_MM: tuple[float, ...] = (5.0, 10.0)

# Images registered per batched solve (bounds memory: robust solves every subset of every image at once).
CHUNK_IMAGES = 256


class Registration(str, enum.Enum):
    """How predicted landmarks become a pose."""

    PLAIN = "lm"  # Levenberg-Marquardt on all visible landmarks
    ROBUST = "robust"  # RANSAC over landmark subsets, then lm on the inliers


@dataclasses.dataclass(frozen=True, eq=False)
class PoseErrors:
    """Per-image pose errors of one predictor on one split with one registration.

    Attributes:
        registration: plain or robust.
        rotation_deg, translation_mm, mtre_mm: (N,) errors.
        degenerate: (N,) the registration could not be trusted.
        pose: (N, 6) estimated poses θ (a degenerate one holds its start).
        votes: (N, L) the landmarks that took part.
        inliers: (N, L) the landmarks the final fit used (robust: RANSAC's
            inliers; plain: the votes).
    """

    registration: Registration
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    mtre_mm: np.ndarray
    degenerate: np.ndarray
    pose: np.ndarray | None = None
    votes: np.ndarray | None = None
    inliers: np.ndarray | None = None

    def success(self, threshold_mm: float) -> np.ndarray:
        """(N,) mTRE below ``threshold_mm`` and not degenerate."""
        return ~self.degenerate & (self.mtre_mm < threshold_mm)

    def summary(self, thresholds_mm: tuple[float, ...] = SUCCESS_THRESHOLDS_MM) -> dict[str, Any]:
        """Means and medians over non-degenerate images, success rates (fractions) over all images."""
        kept = ~self.degenerate
        values: dict[str, Any] = {"images": int(len(kept)), "degenerate": int((~kept).sum())}
        for name in ("rotation_deg", "translation_mm", "mtre_mm"):
            data = getattr(self, name)[kept]
            values[f"{name}_mean"] = float(data.mean()) if len(data) else math.nan
            values[f"{name}_median"] = float(np.median(data)) if len(data) else math.nan
        for threshold in thresholds_mm:
            values[success_key(threshold)] = float(self.success(threshold).mean()) if len(kept) else math.nan
        return values


def success_key(threshold_mm: float) -> str:
    """Column name of a success rate, e.g. ``success_5mm``."""
    return f"success_{threshold_mm:g}mm"


# Per-image mTRE (mm), shared with the DeepFluoro PnP baseline.
mean_target_registration_error = target_registration_errors


def register_detector_points(
    landmarks_detector_px: np.ndarray,
    weights: np.ndarray,
    points_world_mm: np.ndarray,
    poses_true: np.ndarray,
    camera: Camera,
    registration: Registration,
) -> PoseErrors:
    """Register (N, L, 2) detector-px landmarks and compare with the true poses.

    Args:
        landmarks_detector_px: (N, L, 2) landmarks in the store's detector px.
        weights: (N, L) 1 for a landmark to use, 0 otherwise (its point may be NaN).
        points_world_mm: (N, L, 3) the CT's landmarks.
        poses_true: (N, 6) true poses θ.
        camera: the store's detector.
        registration: plain or robust.
    """
    from pelmark.registration import pose_errors, register, register_robust

    landmarks = torch.from_numpy(np.asarray(landmarks_detector_px, dtype=np.float64))
    weights_t = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    landmarks = torch.where(weights_t[..., None] > 0, landmarks, torch.zeros_like(landmarks))
    points = torch.from_numpy(np.asarray(points_world_mm, dtype=np.float64))
    truth = torch.from_numpy(np.asarray(poses_true, dtype=np.float64))
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, len(landmarks), CHUNK_IMAGES):
            chunk = slice(start, start + CHUNK_IMAGES)
            votes = weights_t[chunk] > 0
            if registration is Registration.PLAIN:
                result = register(landmarks[chunk], weights_t[chunk], points[chunk], camera, solver="lm")
                inliers = votes
            else:
                robust = register_robust(landmarks[chunk], weights_t[chunk], points[chunk], camera)
                result, inliers = robust.result, robust.inliers
            pose = result.pose.to(torch.float64)
            rotation, translation = pose_errors(pose, truth[chunk])
            mtre = mean_target_registration_error(pose, truth[chunk], points[chunk])
            parts.append((rotation, translation, mtre, result.degenerate, pose, votes, inliers))
    if not parts:
        empty, none = np.zeros(0), np.zeros((0, landmarks.shape[1]), dtype=bool)
        return PoseErrors(registration, empty, empty, empty, np.zeros(0, dtype=bool), np.zeros((0, 6)), none, none)
    rotation, translation, mtre, degenerate, pose, votes, inliers = (torch.cat(values).numpy() for values in zip(*parts))
    return PoseErrors(
        registration, rotation, translation, mtre, degenerate.astype(bool), pose, votes.astype(bool), inliers.astype(bool)
    )


def pose_metrics(predictions: Predictions, registration: Registration) -> PoseErrors:
    """Register a predictor's landmarks on one split (see the module docstring for which landmarks vote)."""
    truth = predictions.truth
    detector_px = model_to_detector_px(predictions.predicted_px, truth.model_camera, truth.store_camera)
    if registration is Registration.ROBUST and predictions.peak_probability is not None:
        voting = predictions.votes()
    else:
        voting = truth.visible
    weights = (voting & np.isfinite(detector_px).all(-1)).astype(np.float64)
    return register_detector_points(detector_px, weights, truth.landmarks_3d, truth.poses, truth.store_camera, registration)

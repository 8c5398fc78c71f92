"""PnP + RANSAC from detected landmarks, and the errors registration is judged by on real X-rays.

This is the fixed-landmark baseline: detected 2D landmarks and the CT's 3D
landmarks give a pose through :func:`pelmark.registration.register_robust`
(RANSAC over 4-landmark subsets, each solved by LM from the closed form, then
LM on the inliers), and the pose is compared with the ground truth:

* rotation error: geodesic angle between the rotations, degrees;
* translation error: distance between the translations θ_t, mm (θ rotates
  about the CT centre, so this is the error at the CT centre);
* mTRE: mean over the target points of ``|T_est p - T_true p|``, mm;
* success: the registration is not degenerate and its mTRE is below a
  threshold, :data:`DEFAULT_SUCCESS_MTRE_MM` (10 mm) unless asked otherwise.

Everything is a pure function of its arguments (the RANSAC subsets come from
a generator seeded by ``PnPSettings.seed``), so the evaluation stage can call it
on any batch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pelmark.geometry import Camera, rotation_angle_deg
from pelmark.registration import RansacSettings, RegistrationSettings, register_robust, target_registration_errors
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights

DEFAULT_SUCCESS_MTRE_MM = 10.0


@dataclasses.dataclass(frozen=True)
class PnPSettings:
    """How :func:`register_pnp` registers.

    Attributes:
        ransac: inlier threshold (pixels of the given camera) and subset sampling.
        registration: LM tolerances and the depth clamp.
        seed: seed of the random subsets (used only when not all are enumerated).
    """

    ransac: RansacSettings = RansacSettings()
    registration: RegistrationSettings = RegistrationSettings()
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PnPEvaluation:
    """Per-sample poses and errors of :func:`register_pnp` (all float64 / bool, detached).

    Attributes:
        pose: (B, 6) estimated θ.
        inliers: (B, L) landmarks the final LM used.
        degenerate: (B,) the pose cannot be trusted (too few inliers, collinear, ...).
        residual_px: (B,) RMS reprojection error over the inliers.
        rotation_error_deg: (B,) geodesic rotation error.
        translation_error_mm: (B,) translation error.
        mtre_mm: (B,) mean target registration error.
    """

    pose: Tensor
    inliers: Tensor
    degenerate: Tensor
    residual_px: Tensor
    rotation_error_deg: Tensor
    translation_error_mm: Tensor
    mtre_mm: Tensor

    def success(self, threshold_mm: float = DEFAULT_SUCCESS_MTRE_MM) -> Tensor:
        """(B,) non-degenerate registrations with mTRE < ``threshold_mm``."""
        return ~self.degenerate & (self.mtre_mm < threshold_mm)

    def summary(self, thresholds_mm: tuple[float, ...] = (DEFAULT_SUCCESS_MTRE_MM,)) -> dict[str, float]:
        """Success rates and mean errors over the batch, for a results table.

        ``mean_mtre_mm`` averages every sample (failures included);
        ``mean_mtre_success_mm`` only those that succeed at the first threshold.
        """
        n = int(self.mtre_mm.numel())
        values: dict[str, float] = {"n": float(n)}
        for threshold in thresholds_mm:
            values[f"success_rate_{threshold:g}mm"] = float(self.success(threshold).double().mean()) if n else float("nan")
        first = self.success(thresholds_mm[0]) if thresholds_mm else torch.ones(n, dtype=torch.bool)
        values.update(
            mean_mtre_mm=float(self.mtre_mm.mean()) if n else float("nan"),
            median_mtre_mm=float(self.mtre_mm.median()) if n else float("nan"),
            mean_mtre_success_mm=float(self.mtre_mm[first].mean()) if bool(first.any()) else float("nan"),
            mean_rotation_error_deg=float(self.rotation_error_deg.mean()) if n else float("nan"),
            mean_translation_error_mm=float(self.translation_error_mm.mean()) if n else float("nan"),
            degenerate_rate=float(self.degenerate.double().mean()) if n else float("nan"),
        )
        return values


def register_pnp(
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
    pose_true: Pose,
    settings: PnPSettings = PnPSettings(),
    target_points_world_mm: Landmarks3D | None = None,
) -> PnPEvaluation:
    """Register detected landmarks by RANSAC + LM and measure the pose errors.

    Args:
        landmarks_px: (B, L, 2) detections in ``camera``'s pixels (x = column, y = row).
        weights: (B, L) confidences or visibility; 0 (or a NaN detection) drops a landmark.
        points_world_mm: (B, L, 3) or (L, 3) the CT's landmarks in the world frame.
        camera: the camera of ``landmarks_px`` (e.g. a store's, or the model's).
        pose_true: (B, 6) ground-truth θ.
        settings: RANSAC and LM settings, and the subset seed.
        target_points_world_mm: points the mTRE averages over (default: ``points_world_mm``).

    Returns:
        A :class:`PnPEvaluation`. The caller's tensors are not modified.
    """
    with torch.no_grad():
        landmarks = landmarks_px.detach().to(torch.float64)
        weights = weights.detach().to(torch.float64)
        finite = torch.isfinite(landmarks).all(-1)
        weights = torch.where(finite, weights, torch.zeros_like(weights))
        points = points_world_mm.detach().to(torch.float64)
        generator = torch.Generator().manual_seed(settings.seed)
        robust = register_robust(
            landmarks, weights, points, camera, settings.ransac, settings.registration, generator=generator
        )
        pose = robust.result.pose.to(torch.float64)
        truth = pose_true.detach().to(torch.float64)
        targets = points if target_points_world_mm is None else target_points_world_mm.detach().to(torch.float64)
        return PnPEvaluation(
            pose=pose,
            inliers=robust.inliers,
            degenerate=robust.result.degenerate,
            residual_px=robust.result.residual_px.to(torch.float64),
            rotation_error_deg=rotation_angle_deg(pose, truth),
            translation_error_mm=(pose[:, 3:] - truth[:, 3:]).norm(dim=-1),
            mtre_mm=target_registration_errors(pose, truth, targets),
        )

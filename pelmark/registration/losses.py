"""Pose estimation losses: the paper's eq. 10 and two better-scaled alternatives.

Paper eq. 10 is the RMSE over the six raw parameters (r_x, r_y, r_z, t_x, t_y, t_z):
it adds radians to millimetres. One radian is 57°, so a 1° rotation error
(0.017 rad) weighs as much as 0.017 mm of translation: the loss is dominated by
translation, in particular by t along the optical axis, which landmarks
constrain worst. It also depends on choices that have nothing to do with the
task: the Rodrigues vector of a rotation is not unique near |r| = π, and the
translation of the same rigid motion changes with the arbitrary origin (the
CT volume centre) about which it rotates.

* :func:`pose_geodesic_loss` measures the rotation as the geodesic angle
  between the rotations (degrees; independent of the parameterisation) and the
  translation as a Euclidean distance (mm). For a pelvis of radius ~100 mm a
  degree moves the landmarks by ~1.7 mm, so the two terms are commensurate.
* :func:`mtre_loss` (mean target registration error) applies both poses to
  the landmarks and averages the distances, in mm: the one unit that matters
  for landmark detection, weighting rotation by the lever arm the anatomy
  actually has, and invariant to the choice of origin.
* :func:`reprojection_loss` projects the landmarks with both poses through the
  camera and averages the distances between the two projections, in pixels:
  the error that Table 1 measures, for the landmarks the registered pose
  predicts.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, project, rotation_angle_deg, transform_points
from pelmark.types import Landmarks3D, Pose


class PoseLoss(str, enum.Enum):
    """Which pose loss :func:`pose_loss` computes."""

    PAPER = "paper"
    GEODESIC = "geodesic"
    MTRE = "mtre"
    REPROJECTION = "reprojection"


def _safe_sqrt(value: Tensor) -> Tensor:
    """sqrt with value 0 and gradient 0 (not NaN) at 0, so a perfect prediction trains."""
    positive = value > 0
    return torch.where(positive, torch.where(positive, value, torch.ones_like(value)).sqrt(), torch.zeros_like(value))


def pel_paper(pose_est: Pose, pose_true: Pose) -> Tensor:
    """Paper eq. 10, sqrt(mean_j (θ_j - θ*_j)²) over the six parameters, averaged over the batch.

    Args:
        pose_est: (B, 6) estimated poses (r rad, t mm).
        pose_true: (B, 6) true poses.

    Returns:
        Scalar loss (mixed rad/mm units, as in the paper).
    """
    return _safe_sqrt((pose_est - pose_true).square().mean(-1)).mean()


def pose_errors(pose_est: Pose, pose_true: Pose) -> tuple[Tensor, Tensor]:
    """Per-sample rotation error (geodesic, degrees) and translation error (mm), each (B,)."""
    rotation_deg = rotation_angle_deg(pose_est, pose_true)
    translation_mm = _safe_sqrt((pose_est[..., 3:] - pose_true[..., 3:]).square().sum(-1))
    return rotation_deg, translation_mm


def pose_geodesic_loss(pose_est: Pose, pose_true: Pose) -> Tensor:
    """Mean over the batch of rotation geodesic (degrees) + translation distance (mm).

    Symmetric in its arguments and independent of the rotation parameterisation.
    """
    rotation_deg, translation_mm = pose_errors(pose_est, pose_true)
    return (rotation_deg + translation_mm).mean()


def mtre_loss(pose_est: Pose, pose_true: Pose, points_world_mm: Landmarks3D) -> Tensor:
    """Mean target registration error (mm): mean_{b, i} |T_est p_i - T_true p_i|.

    Args:
        pose_est: (B, 6) estimated poses.
        pose_true: (B, 6) true poses.
        points_world_mm: (B, L, 3) or (L, 3) landmarks in the world frame.

    Returns:
        Scalar mean distance in mm.
    """
    return target_registration_errors(pose_est, pose_true, points_world_mm).mean()


def target_registration_errors(pose_est: Pose, pose_true: Pose, points_world_mm: Landmarks3D) -> Tensor:
    """(B,) per-sample mean target registration error (mm): mean_i |T_est p_i - T_true p_i|.

    Args:
        pose_est: (B, 6) estimated poses.
        pose_true: (B, 6) true poses.
        points_world_mm: (B, L, 3) or (L, 3) target points in the world frame.
    """
    moved_est = transform_points(pose_est, points_world_mm)
    moved_true = transform_points(pose_true, points_world_mm)
    return _safe_sqrt((moved_est - moved_true).square().sum(-1)).mean(-1)


def reprojection_loss(pose_est: Pose, pose_true: Pose, points_world_mm: Landmarks3D, camera: Camera) -> Tensor:
    """Mean distance (px) between the landmarks projected with the estimated and with the true pose.

    Args:
        pose_est: (B, 6) estimated poses.
        pose_true: (B, 6) true poses.
        points_world_mm: (B, L, 3) or (L, 3) landmarks in the world frame.
        camera: the camera both projections use.

    Returns:
        Scalar mean over the batch and the landmarks, in the camera's pixels.
    """
    points = points_world_mm.expand(pose_est.shape[0], -1, -1) if points_world_mm.ndim == 2 else points_world_mm
    estimated = project(points, pose_est, camera)
    true = project(points, pose_true, camera)
    return _safe_sqrt((estimated - true).square().sum(-1)).mean()


def pose_loss(
    kind: PoseLoss | str,
    pose_est: Pose,
    pose_true: Pose,
    points_world_mm: Landmarks3D | None = None,
    camera: Camera | None = None,
) -> Tensor:
    """The pose loss named by ``kind``.

    Raises:
        PelmarkError: for an unknown kind, ``mtre`` or ``reprojection`` without
            ``points_world_mm``, or ``reprojection`` without ``camera``.
    """
    try:
        kind = PoseLoss(kind)
    except ValueError as error:
        raise PelmarkError(f"unknown pose loss {kind!r}; use one of {[k.value for k in PoseLoss]}") from error
    if kind is PoseLoss.PAPER:
        return pel_paper(pose_est, pose_true)
    if kind is PoseLoss.GEODESIC:
        return pose_geodesic_loss(pose_est, pose_true)
    if points_world_mm is None:
        raise PelmarkError(f"the {kind.value} pose loss needs points_world_mm")
    if kind is PoseLoss.MTRE:
        return mtre_loss(pose_est, pose_true, points_world_mm)
    if camera is None:
        raise PelmarkError("the reprojection pose loss needs the camera")
    return reprojection_loss(pose_est, pose_true, points_world_mm, camera)

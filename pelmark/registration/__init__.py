"""Differentiable 2D/3D landmark registration and the pose estimation losses (paper eqs. 3-10).

Public API:
    register: batched pose from 2D detections and 3D landmarks (lm / adam / lbfgs).
    register_robust: RANSAC over landmark subsets, then lm on the inliers.
    closed_form_pose: the DLT start on calibrated rays.
    pose_loss and friends: paper eq. 10 and better-scaled alternatives.
"""

from pelmark.registration.api import register
from pelmark.registration.init import closed_form_pose
from pelmark.registration.losses import (
    PoseLoss,
    mtre_loss,
    reprojection_loss,
    pel_paper,
    pose_errors,
    pose_geodesic_loss,
    pose_loss,
    target_registration_errors,
)
from pelmark.registration.options import (
    AdamSettings,
    Degeneracy,
    Init,
    LBFGSSettings,
    LMSettings,
    RegistrationSettings,
    Solver,
)
from pelmark.registration.result import RegistrationResult, RobustResult
from pelmark.registration.robust import RansacSettings, register_robust

__all__ = [
    "AdamSettings",
    "Degeneracy",
    "Init",
    "LBFGSSettings",
    "LMSettings",
    "PoseLoss",
    "RansacSettings",
    "RegistrationResult",
    "RegistrationSettings",
    "RobustResult",
    "Solver",
    "closed_form_pose",
    "mtre_loss",
    "reprojection_loss",
    "pel_paper",
    "pose_errors",
    "pose_geodesic_loss",
    "pose_loss",
    "register",
    "register_robust",
    "target_registration_errors",
]

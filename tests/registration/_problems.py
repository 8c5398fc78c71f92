"""Synthetic registration problems the tests make themselves."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pelmark.geometry import Camera, project, rotation_angle_deg, sample_poses

F64 = torch.float64
# Spread of the eight landmarks around the CT centre, like a pelvis (mm): ±120 x, ±60 y, ±80 z.
PELVIS_HALF_EXTENT_MM = np.array([120.0, 60.0, 80.0])


def camera() -> Camera:
    """The paper's C-arm: 768 px, SDD 1020 mm, 0.388 mm pixels, SID 850 mm."""
    return Camera.centered(768, sdd_mm=1020.0, spacing_mm=0.388, sid_mm=850.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    camera: Camera
    pose_true: torch.Tensor  # (B, 6)
    points_world_mm: torch.Tensor  # (B, L, 3)
    clean_px: torch.Tensor  # (B, L, 2) noise-free projections
    landmarks_px: torch.Tensor  # (B, L, 2) with noise
    weights: torch.Tensor  # (B, L) ones


def make_problem(
    batch: int,
    seed: int,
    noise_px: float = 0.0,
    count: int = 8,
    rotation_deg: float = 45.0,
    translation_mm: float = 50.0,
) -> Problem:
    """Random pelvis-like points, poses from ``sample_poses`` and (noisy) projections, float64."""
    rng = np.random.default_rng(seed)
    points = torch.from_numpy(rng.uniform(-PELVIS_HALF_EXTENT_MM, PELVIS_HALF_EXTENT_MM, size=(batch, count, 3)))
    pose = torch.from_numpy(sample_poses(batch, rotation_deg, translation_mm, rng))
    cam = camera()
    clean = project(points, pose, cam)
    noisy = clean + noise_px * torch.from_numpy(rng.standard_normal(clean.shape))
    return Problem(
        camera=cam,
        pose_true=pose,
        points_world_mm=points,
        clean_px=clean,
        landmarks_px=noisy,
        weights=torch.ones(batch, count, dtype=F64),
    )


def rotation_error_rad(pose_a: torch.Tensor, pose_b: torch.Tensor) -> torch.Tensor:
    """(B,) geodesic angle between the rotations, radians."""
    return torch.deg2rad(rotation_angle_deg(pose_a, pose_b))


def translation_error_mm(pose_a: torch.Tensor, pose_b: torch.Tensor) -> torch.Tensor:
    return (pose_a[:, 3:] - pose_b[:, 3:]).norm(dim=-1)

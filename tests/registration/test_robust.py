"""RANSAC registration: a gross outlier is rejected, and the sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from pelmark.errors import PelmarkError
from pelmark.registration import RansacSettings, register, register_robust

from ._problems import make_problem, rotation_error_rad, translation_error_mm


def _with_outlier(batch: int = 4, seed: int = 40):
    problem = make_problem(batch, seed=seed, noise_px=1.0)
    landmarks = problem.landmarks_px.clone()
    landmarks[:, 3, 0] += 80.0  # one landmark 80 px off in every sample
    return problem, landmarks


def test_gross_outlier_is_rejected():
    problem, landmarks = _with_outlier()
    plain = register(landmarks, problem.weights, problem.points_world_mm, problem.camera)
    robust = register_robust(landmarks, problem.weights, problem.points_world_mm, problem.camera)
    expected = torch.ones_like(robust.inliers)
    expected[:, 3] = False
    assert torch.equal(robust.inliers, expected)
    assert robust.hypotheses == 70  # C(8, 4), all enumerated
    assert not robust.result.degenerate.any()

    # Compared with the same detections without the outlier, robust is close and plain is not.
    clean = problem.weights.clone()
    clean[:, 3] = 0.0
    reference = register(landmarks, clean, problem.points_world_mm, problem.camera)
    torch.testing.assert_close(robust.result.pose, reference.pose, rtol=0, atol=1e-6)
    plain_error = translation_error_mm(plain.pose, problem.pose_true)
    robust_error = translation_error_mm(robust.result.pose, problem.pose_true)
    assert (robust_error < 5.0).all()
    assert plain_error.max() > 3.0 * robust_error.max()
    assert (torch.rad2deg(rotation_error_rad(robust.result.pose, problem.pose_true)) < 1.0).all()


def test_random_subsets_are_reproducible_with_a_generator():
    problem, landmarks = _with_outlier(batch=2, seed=41)
    ransac = RansacSettings(max_subsets=20)  # fewer than C(8, 4) = 70: drawn at random
    args = (landmarks, problem.weights, problem.points_world_mm, problem.camera, ransac)
    first = register_robust(*args, generator=torch.Generator().manual_seed(5))
    second = register_robust(*args, generator=torch.Generator().manual_seed(5))
    assert first.hypotheses == 20
    assert torch.equal(first.result.pose, second.result.pose)
    assert torch.equal(first.inliers, second.inliers)
    assert not first.inliers[:, 3].any()


def test_robust_result_is_differentiable():
    problem, landmarks = _with_outlier(batch=2, seed=42)
    landmarks = landmarks.requires_grad_(True)
    robust = register_robust(landmarks, problem.weights, problem.points_world_mm, problem.camera)
    robust.result.pose.sum().backward()
    assert torch.isfinite(landmarks.grad).all()
    # The rejected landmark has no influence on the pose.
    assert torch.equal(landmarks.grad[:, 3], torch.zeros_like(landmarks.grad[:, 3]))


def test_bad_subset_size_raises():
    problem = make_problem(1, seed=43)
    with pytest.raises(PelmarkError, match="subset_size"):
        args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
        register_robust(*args, RansacSettings(subset_size=9))

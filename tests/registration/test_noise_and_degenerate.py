"""Pose errors under detection noise, and degenerate samples that must not break a batch."""

from __future__ import annotations

import pytest
import numpy as np
import torch

from pelmark.registration import Degeneracy, RegistrationSettings, Solver, register
from pelmark.registration.checks import solution_reason

from ._problems import F64, make_problem, translation_error_mm
from ._reference import project_with_jacobian

NOISE_PX = 2.0


def test_noise_matches_first_order_covariance():
    # One pose and one set of points, 400 independent 2 px noise draws. To first
    # order the estimate is θ* + (JᵀJ)⁻¹Jᵀn, so its covariance is σ²(JᵀJ)⁻¹ and
    # the Mahalanobis distance Δθᵀ Σ⁻¹ Δθ is χ² with 6 degrees of freedom (mean 6,
    # variance 12: the mean of 400 has standard deviation 0.17).
    draws = 400
    base = make_problem(1, seed=30)
    points = base.points_world_mm.expand(draws, -1, -1)
    pose_true = base.pose_true.expand(draws, -1)
    generator = torch.Generator().manual_seed(30)
    noise = NOISE_PX * torch.randn(draws, 8, 2, dtype=F64, generator=generator)
    landmarks = base.clean_px.expand(draws, -1, -1) + noise
    result = register(landmarks, torch.ones(draws, 8, dtype=F64), points, base.camera)
    assert result.converged.all()

    _, _, jacobian = project_with_jacobian(base.points_world_mm, base.pose_true, base.camera, 1e-3)
    flat = jacobian.reshape(16, 6)
    covariance = NOISE_PX**2 * torch.linalg.inv(flat.T @ flat)
    error = result.pose - pose_true
    predicted_std = covariance.diagonal().sqrt()
    ratio = error.std(dim=0) / predicted_std
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    assert (error.mean(dim=0).abs() < 0.2 * predicted_std).all()
    mahalanobis = (error @ torch.linalg.inv(covariance) * error).sum(-1)
    assert 5.3 < mahalanobis.mean() < 6.7
    # The residual is the noise left after fitting 6 parameters to 16 numbers:
    # E|e|² = σ² (16 - 6), so the RMS over 8 landmarks is σ sqrt(10/8).
    rms = result.residual_px.square().mean().sqrt()
    assert abs(rms / (NOISE_PX * (10 / 8) ** 0.5) - 1.0) < 0.05


def _mixed_batch():
    """Sample 0 good; 1 three visible; 2 collinear points; 3 all weights 0; 4 NaN visible; 5 good."""
    problem = make_problem(6, seed=31, noise_px=1.0)
    landmarks = problem.landmarks_px.clone()
    weights = problem.weights.clone()
    points = problem.points_world_mm.clone()
    weights[1, 3:] = 0.0
    line = torch.linspace(-100.0, 100.0, 8, dtype=F64)
    points[2] = torch.stack([line, 0.5 * line, -0.2 * line], dim=-1)
    weights[3] = 0.0
    landmarks[4, 2, 0] = float("nan")
    return problem, landmarks, weights, points


EXPECTED = {
    1: Degeneracy.FEW_VISIBLE,
    2: Degeneracy.COLLINEAR,
    3: Degeneracy.FEW_VISIBLE,
    4: Degeneracy.NON_FINITE,
}


@pytest.mark.parametrize("solver", list(Solver))
def test_degenerate_samples_are_flagged_and_harmless(solver):
    problem, landmarks, weights, points = _mixed_batch()
    landmarks = landmarks.requires_grad_(True)
    weights = weights.requires_grad_(True)
    result = register(landmarks, weights, points, problem.camera, solver=solver)

    assert result.degenerate.tolist() == [False, True, True, True, True, False]
    for index, flag in EXPECTED.items():
        assert result.reasons(index) & flag, (index, result.reasons(index))
    assert not result.converged[1:5].any()
    assert torch.isfinite(result.pose).all() and torch.isfinite(result.residual_px).all()
    torch.testing.assert_close(result.pose[1:5], result.init_pose[1:5].to(result.pose.dtype))

    (result.pose**2).sum().backward()
    for grad in (landmarks.grad, weights.grad):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1:5], torch.zeros_like(grad[1:5]))
        assert grad[[0, 5]].abs().amax() > 0


def test_good_samples_unaffected_by_degenerate_neighbours():
    problem, landmarks, weights, points = _mixed_batch()
    together = register(landmarks, weights, points, problem.camera)
    alone = register(landmarks[[0, 5]], weights[[0, 5]], points[[0, 5]], problem.camera)
    torch.testing.assert_close(together.pose[[0, 5]], alone.pose, rtol=0, atol=1e-9)
    assert translation_error_mm(alone.pose, problem.pose_true[[0, 5]]).max() < 5.0


def test_points_behind_the_source_are_flagged():
    # Moved 1000 mm anterior the whole pelvis is behind the source (850 mm anterior):
    # the depth clamp flattens the cost there, so the solve cannot leave.
    problem = make_problem(2, seed=32)
    start = problem.pose_true.clone()
    start[0, 4] += 1000.0
    landmarks = problem.clean_px.clone().requires_grad_(True)
    result = register(landmarks, problem.weights, problem.points_world_mm, problem.camera, init=start)
    assert result.reasons(0) & Degeneracy.BEHIND_SOURCE
    assert not result.degenerate[1]
    assert torch.isfinite(result.pose).all()
    result.pose.sum().backward()
    assert torch.isfinite(landmarks.grad).all() and torch.equal(landmarks.grad[0], torch.zeros_like(landmarks.grad[0]))


def test_singular_normal_equations_are_flagged():
    eye = np.repeat(np.eye(6)[None], 2, axis=0)
    eye[1, 2, 2] = 0.0  # no signal in one direction
    eye[1, 4, 4] = 1e-300
    reason = solution_reason(np.full((2, 8), 800.0), np.ones((2, 8)), eye, np.zeros((2, 6)), RegistrationSettings())
    assert reason.tolist() == [0, int(Degeneracy.SINGULAR)]

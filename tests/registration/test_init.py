"""The closed-form (DLT) start and the choice between it and the identity."""

from __future__ import annotations

import numpy as np
import torch

from pelmark.registration import closed_form_pose
from pelmark.registration.init import _bilinear, _dlt_rows, _translation_rows, initial_pose, starting_poses

from ._problems import F64, make_problem, rotation_error_rad, translation_error_mm


def test_closed_form_is_exact_without_noise():
    problem = make_problem(16, seed=10)
    pose, ok = closed_form_pose(problem.clean_px, problem.weights, problem.points_world_mm, problem.camera)
    assert ok.all()
    assert translation_error_mm(pose, problem.pose_true).max() < 1e-6
    assert rotation_error_rad(pose, problem.pose_true).max() < 1e-9


def test_closed_form_is_close_with_noise():
    problem = make_problem(32, seed=11, noise_px=1.0)
    pose, ok = closed_form_pose(problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
    # A start, not an answer: within a few degrees and centimetres (depth is the weak direction).
    assert ok.float().mean() > 0.9
    assert torch.rad2deg(rotation_error_rad(pose, problem.pose_true))[ok].max() < 5.0
    assert translation_error_mm(pose, problem.pose_true)[ok].max() < 30.0


def test_bilinear_rows_are_the_dlt_and_translation_rows():
    # Row by row, as the DLT is written on paper: (h, 0, -x n | x) and (0, h, -y n | y) with
    # h = (n, 1); for t given R, (1, 0, -x | x q_z - q_x) and (0, 1, -y | y q_z - q_y).
    rng = np.random.default_rng(4)
    ray, n, q = rng.standard_normal((2, 5, 2)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3))
    x, y = ray[..., :1], ray[..., 1:]
    one, zero, zero4 = np.ones_like(x), np.zeros_like(x), np.zeros((2, 5, 4))
    h = np.concatenate([n, one], axis=-1)
    rays = np.concatenate([one, ray], axis=-1)

    dlt = _bilinear(rays, h, _dlt_rows())
    np.testing.assert_array_equal(dlt[..., 0, :], np.concatenate([h, zero4, -x * n, x], axis=-1))
    np.testing.assert_array_equal(dlt[..., 1, :], np.concatenate([zero4, h, -y * n, y], axis=-1))

    rows = _bilinear(rays, np.concatenate([one, q], axis=-1), _translation_rows())
    q_x, q_y, q_z = q[..., 0], q[..., 1], q[..., 2]
    expected_x = np.concatenate([one, zero, -x, (x[..., 0] * q_z - q_x)[..., None]], axis=-1)
    expected_y = np.concatenate([zero, one, -y, (y[..., 0] * q_z - q_y)[..., None]], axis=-1)
    np.testing.assert_allclose(rows[..., 0, :], expected_x, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(rows[..., 1, :], expected_y, rtol=1e-15, atol=1e-15)


def test_closed_form_declines_too_few_points():
    problem = make_problem(2, seed=12)
    weights = problem.weights.clone()
    weights[:, 5:] = 0.0  # five visible: the DLT's 11 unknowns need six
    pose, ok = closed_form_pose(problem.clean_px, weights, problem.points_world_mm, problem.camera)
    assert not ok.any()
    assert torch.equal(pose, torch.zeros_like(pose))


def test_closed_form_candidates_and_choice():
    problem = make_problem(3, seed=13)
    args = (problem.clean_px, problem.weights, problem.points_world_mm, problem.camera)
    starts = starting_poses("closed_form", *args)
    assert starts.shape == (2, 3, 6)
    assert torch.equal(starts[1], torch.zeros(3, 6, dtype=F64))
    chosen = initial_pose("closed_form", *args, 1e-3)
    torch.testing.assert_close(chosen, starts[0])
    assert starting_poses("identity", *args).shape == (1, 3, 6)


def test_identity_chosen_when_it_fits_better():
    # Landmarks of the identity pose, but with the closed form forced unusable (5 points):
    problem = make_problem(2, seed=14, rotation_deg=0.0, translation_mm=0.0)
    weights = problem.weights.clone()
    weights[:, 5:] = 0.0
    chosen = initial_pose("closed_form", problem.clean_px, weights, problem.points_world_mm, problem.camera, 1e-3)
    assert torch.equal(chosen, torch.zeros(2, 6, dtype=F64))

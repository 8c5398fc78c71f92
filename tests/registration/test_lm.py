"""Levenberg-Marquardt: exact recovery, dtype handling, and the caller's tensors left alone."""

from __future__ import annotations

import pytest
import torch

from pelmark.errors import PelmarkError
from pelmark.geometry import project
from pelmark.registration import Init, RegistrationSettings, Solver, register, register_robust

from ._problems import F64, make_problem, rotation_error_rad, translation_error_mm


@pytest.mark.parametrize("init", [Init.CLOSED_FORM, Init.IDENTITY])
def test_exact_recovery(init):
    problem = make_problem(16, seed=0)
    result = register(problem.clean_px, problem.weights, problem.points_world_mm, problem.camera, Solver.LM, init)
    assert result.pose.dtype == F64
    assert result.converged.all() and not result.degenerate.any()
    assert translation_error_mm(result.pose, problem.pose_true).max() < 1e-3
    assert rotation_error_rad(result.pose, problem.pose_true).max() < 1e-5
    assert result.residual_px.max() < 1e-4
    assert (result.pose[:, :3].norm(dim=-1) <= torch.pi).all()
    assert (result.iterations <= RegistrationSettings().lm.max_iterations).all()


def test_closed_form_start_needs_fewer_iterations_than_identity():
    problem = make_problem(16, seed=1, noise_px=1.0)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera, Solver.LM)
    from_closed = register(*args, Init.CLOSED_FORM)
    from_identity = register(*args, Init.IDENTITY)
    assert from_closed.iterations.float().mean() < from_identity.iterations.float().mean()
    # Both reach the same minimum.
    torch.testing.assert_close(from_closed.pose, from_identity.pose, rtol=0, atol=1e-5)


def test_given_initial_pose_is_used():
    problem = make_problem(4, seed=2)
    start = problem.pose_true + 0.01
    result = register(problem.clean_px, problem.weights, problem.points_world_mm, problem.camera, init=start)
    torch.testing.assert_close(result.init_pose, start)
    assert translation_error_mm(result.pose, problem.pose_true).max() < 1e-3


def test_float32_in_float32_out_and_inputs_untouched():
    problem = make_problem(4, seed=3, noise_px=1.0)
    landmarks = problem.landmarks_px.float()
    weights = problem.weights.float()
    points = problem.points_world_mm.float()
    copies = [x.clone() for x in (landmarks, weights, points)]
    result = register(landmarks, weights, points, problem.camera)
    assert result.pose.dtype == torch.float32
    assert result.residual_px.dtype == torch.float32
    for original, copy in zip((landmarks, weights, points), copies):
        assert torch.equal(original, copy)
    reference = register(problem.landmarks_px.float().double(), problem.weights, points.double(), problem.camera)
    torch.testing.assert_close(result.pose.double(), reference.pose, rtol=0, atol=1e-5)


def test_weights_act_per_landmark_and_scale_free():
    problem = make_problem(2, seed=4, noise_px=2.0)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
    base = register(*args)
    scaled = register(problem.landmarks_px, 7.0 * problem.weights, problem.points_world_mm, problem.camera)
    torch.testing.assert_close(scaled.pose, base.pose, rtol=0, atol=1e-7)
    # An invisible landmark may hold NaN: it is ignored, and moving it changes nothing.
    hidden = problem.weights.clone()
    hidden[:, 0] = 0.0
    moved = problem.landmarks_px.clone()
    moved[:, 0] = float("nan")
    a = register(problem.landmarks_px, hidden, problem.points_world_mm, problem.camera)
    b = register(moved, hidden, problem.points_world_mm, problem.camera)
    assert not b.degenerate.any()
    torch.testing.assert_close(a.pose, b.pose)
    assert (a.pose - base.pose).abs().max() > 1e-6  # dropping a noisy landmark does move the pose


def test_shared_points_broadcast():
    problem = make_problem(3, seed=5)
    shared = problem.points_world_mm[0]
    landmarks = project(shared.expand(3, -1, -1), problem.pose_true, problem.camera)
    result = register(landmarks, problem.weights, shared, problem.camera)
    assert translation_error_mm(result.pose, problem.pose_true).max() < 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda l, w, p: (l[..., :1], w, p), "landmarks_px"),
        (lambda l, w, p: (l, w[:, :3], p), "weights"),
        (lambda l, w, p: (l, w, p[:, :3]), "points_world_mm"),
        (lambda l, w, p: (l, -w, p), ">= 0"),
    ],
)
def test_bad_arguments_raise_one_line_errors(change, message):
    problem = make_problem(2, seed=6)
    landmarks, weights, points = change(problem.landmarks_px, problem.weights, problem.points_world_mm)
    with pytest.raises(PelmarkError, match=message):
        register(landmarks, weights, points, problem.camera)


def test_unknown_names_raise():
    problem = make_problem(1, seed=7)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
    with pytest.raises(PelmarkError, match="solver"):
        register(*args, solver="newton")
    with pytest.raises(PelmarkError, match="init"):
        register(*args, init="random")
    with pytest.raises(PelmarkError, match="init pose"):
        register(*args, init=torch.zeros(2, 6))
    # The enums' string values are accepted.
    assert register(*args, solver="lm", init="identity").converged.all()


@pytest.mark.parametrize("solver", list(Solver))
def test_no_solver_modifies_its_inputs(solver):
    problem = make_problem(2, seed=8, noise_px=1.0)
    landmarks = problem.landmarks_px.clone().requires_grad_(True)
    weights = problem.weights.clone()
    weights[0, 1] = 0.0
    points = problem.points_world_mm.clone()
    start = torch.zeros(2, 6, dtype=F64)
    before = [x.detach().clone() for x in (landmarks, weights, points, start)]
    result = register(landmarks, weights, points, problem.camera, solver=solver, init=start)
    result.pose.sum().backward()
    register_robust(landmarks, weights, points, problem.camera)
    for tensor, copy in zip((landmarks, weights, points, start), before):
        assert torch.equal(tensor.detach(), copy)


def test_a_sample_is_solved_alike_whatever_else_is_in_its_batch():
    # Once most of a batch has stopped, the solver evaluates only the samples still running
    # (RANSAC's many short solves); that shortcut must not change any sample's solve.
    from pelmark.registration.init import starting_poses
    from pelmark.registration.lm import solve_lm

    problem = make_problem(12, seed=70, noise_px=8.0)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm)
    starts = starting_poses("identity", *args, problem.camera)  # far starts: the solves differ in length
    settings = RegistrationSettings()
    together = solve_lm(*args, problem.camera, starts, torch.ones(12, dtype=torch.bool), settings.lm, 1e-3)
    # Samples stop at different rounds, and in the last ones at most half the batch is still running.
    assert int(together.iterations.sort().values[5]) < int(together.iterations.max())
    for k in range(12):
        one = (x[k : k + 1] for x in args)
        alone = solve_lm(*one, problem.camera, starts[:, k : k + 1], torch.ones(1, dtype=torch.bool), settings.lm, 1e-3)
        for field in ("pose", "cost", "gauss_newton", "pixels", "depth_mm", "iterations", "converged"):
            torch.testing.assert_close(getattr(alone, field)[0], getattr(together, field)[k], rtol=0, atol=1e-9)

"""The paper's unrolled optimisers: what they reach, and their bounds."""

from __future__ import annotations

import math

import torch

from pelmark.registration import AdamSettings, LBFGSSettings, RegistrationSettings, Solver, register

from ._problems import make_problem, translation_error_mm


def test_paper_adam_does_not_converge_in_100_steps_but_improves():
    # Adam's steps are about lr in every coordinate (|m̂/√v̂| ≈ 1 for a steady
    # gradient), so lr 1e-3 for 100 steps moves each parameter by ~0.1 (rad or mm):
    # far from poses of ±45° and ±50 mm. The fit still improves on the identity.
    problem = make_problem(4, seed=50, noise_px=1.0)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
    adam = register(*args, solver=Solver.ADAM)
    start = register(*args, solver=Solver.ADAM, settings=RegistrationSettings(adam=AdamSettings(iterations=0)))
    assert not adam.converged.any()
    assert (adam.residual_px < start.residual_px).all()
    assert ((adam.pose - start.pose).abs().amax(-1) <= 100 * 1e-3 * 1.5).all()
    assert (adam.iterations == 100).all()


def test_lbfgs_reaches_the_lm_minimum():
    problem = make_problem(4, seed=51, noise_px=1.0, rotation_deg=20.0, translation_mm=20.0)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
    settings = RegistrationSettings(lbfgs=LBFGSSettings(max_iterations=300))
    lbfgs = register(*args, solver=Solver.LBFGS, settings=settings)
    lm = register(*args)
    assert lbfgs.converged.all()
    torch.testing.assert_close(lbfgs.pose, lm.pose, rtol=0, atol=1e-5)
    assert translation_error_mm(lbfgs.pose, problem.pose_true).max() < 5.0


def test_unrolled_bounds_are_respected():
    problem = make_problem(2, seed=52, noise_px=1.0)
    args = (problem.landmarks_px, problem.weights, problem.points_world_mm, problem.camera)
    settings = RegistrationSettings(translation_bound_mm=0.05, rotation_bound_rad=0.01, adam=AdamSettings(lr=0.1))
    for solver in (Solver.ADAM, Solver.LBFGS):
        pose = register(*args, solver=solver, settings=settings).pose
        assert pose[:, :3].abs().max() <= 0.01 + 1e-12
        assert pose[:, 3:].abs().max() <= 0.05 + 1e-12
    default = RegistrationSettings()
    assert math.isclose(default.rotation_bound_rad, 2 * math.pi)

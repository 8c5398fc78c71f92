"""The implicit backward of LM, and the unrolled solvers' backpropagation."""

from __future__ import annotations

import pytest
import torch

from pelmark.registration import LBFGSSettings, LMSettings, RegistrationSettings, Solver, register

from ._problems import F64, make_problem
from ._reference import normal_equations, project_with_jacobian

# Finite differences of the solution need it converged to rounding, not just to
# the (ample for training) default tolerance.
TIGHT = RegistrationSettings(lm=LMSettings(step_tolerance=1e-13, cost_tolerance=1e-20))


def _noisy(batch: int, seed: int, noise_px: float = 3.0, count: int = 6):
    problem = make_problem(batch, seed=seed, noise_px=noise_px, count=count)
    weights = 0.5 + torch.rand(batch, count, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return problem, weights


def test_implicit_backward_gradcheck():
    problem, weights = _noisy(2, seed=20)
    inputs = (
        problem.landmarks_px.clone().requires_grad_(True),
        weights.clone().requires_grad_(True),
        problem.points_world_mm.clone().requires_grad_(True),
    )

    def solve(landmarks, w, points):
        return register(landmarks, w, points, problem.camera, settings=TIGHT).pose

    assert torch.autograd.gradcheck(solve, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _unrolled_gauss_newton(landmarks, weights, points, camera, start, iterations):
    """Plain GN from ``start``, differentiable through every iteration (the reference)."""
    pose = start
    for _ in range(iterations):
        pixels, _, jacobian = project_with_jacobian(points, pose, camera, 1e-3)
        hessian, gradient = normal_equations(jacobian, pixels - landmarks, weights)
        pose = pose - torch.linalg.solve(hessian, gradient)
    return pose


@pytest.mark.parametrize("seed", [21, 22])
def test_implicit_gradient_matches_backprop_through_converged_iterations(seed):
    problem, weights = _noisy(4, seed=seed, noise_px=4.0, count=8)
    target = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(seed))

    def grads(solve):
        landmarks = problem.landmarks_px.clone().requires_grad_(True)
        w = weights.clone().requires_grad_(True)
        pose = solve(landmarks, w)
        ((pose - target).square().sum()).backward()
        return torch.cat([landmarks.grad.flatten(), w.grad.flatten()])

    implicit = grads(lambda l, w: register(l, w, problem.points_world_mm, problem.camera).pose)
    start = register(problem.landmarks_px, weights, problem.points_world_mm, problem.camera).init_pose
    unrolled = grads(
        lambda l, w: _unrolled_gauss_newton(l, w, problem.points_world_mm, problem.camera, start, iterations=40)
    )
    cosine = torch.nn.functional.cosine_similarity(implicit, unrolled, dim=0)
    assert cosine >= 0.999
    torch.testing.assert_close(implicit, unrolled, rtol=1e-4, atol=1e-8 * unrolled.abs().max())


def test_gauss_newton_hessian_would_bias_the_gradient():
    # The exact Hessian is needed: -(JᵀWJ)⁻¹ ∂F/∂l differs from the true derivative
    # when residuals are not zero (here 5 px noise).
    problem, weights = _noisy(2, seed=23, noise_px=5.0, count=8)
    landmarks = problem.landmarks_px.clone().requires_grad_(True)
    result = register(landmarks, weights, problem.points_world_mm, problem.camera)
    grad_pose = torch.zeros(2, 6, dtype=F64)
    grad_pose[:, 5] = 1.0
    (result.pose * grad_pose).sum().backward()
    with torch.no_grad():
        _, _, jacobian = project_with_jacobian(problem.points_world_mm, result.pose, problem.camera, 1e-3)
        hessian, _ = normal_equations(jacobian, torch.zeros_like(landmarks), weights)
        v = torch.linalg.solve(hessian, grad_pose)
        gauss_newton_grad = weights[..., None] * (jacobian @ v[:, None, :, None])[..., 0]
    relative = (gauss_newton_grad - landmarks.grad).norm() / landmarks.grad.norm()
    assert relative > 1e-3


def test_gradients_reach_points_and_are_zero_only_where_expected():
    problem, weights = _noisy(3, seed=24)
    landmarks = problem.landmarks_px.clone().requires_grad_(True)
    points = problem.points_world_mm.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    pose = register(landmarks, w, points, problem.camera).pose
    pose.sum().backward()
    for grad in (landmarks.grad, w.grad, points.grad):
        assert torch.isfinite(grad).all() and grad.abs().amax() > 0
    # A landmark of weight 0 has no pull on the pose, but its weight does.
    hidden = weights.clone()
    hidden[:, 0] = 0.0
    landmarks2 = problem.landmarks_px.clone().requires_grad_(True)
    w2 = hidden.clone().requires_grad_(True)
    register(landmarks2, w2, problem.points_world_mm, problem.camera).pose.sum().backward()
    assert torch.equal(landmarks2.grad[:, 0], torch.zeros_like(landmarks2.grad[:, 0]))
    assert (w2.grad[:, 0].abs() > 0).all()


def test_float32_gradients():
    problem, weights = _noisy(2, seed=25)
    landmarks = problem.landmarks_px.float().requires_grad_(True)
    pose = register(landmarks, weights.float(), problem.points_world_mm.float(), problem.camera).pose
    pose.square().sum().backward()
    assert landmarks.grad.dtype == torch.float32 and torch.isfinite(landmarks.grad).all()


@pytest.mark.parametrize("solver", [Solver.ADAM, Solver.LBFGS])
def test_unrolled_solvers_backpropagate_through_iterations(solver):
    problem, weights = _noisy(2, seed=26, noise_px=2.0, count=8)
    landmarks = problem.landmarks_px.clone().requires_grad_(True)
    pose = register(landmarks, weights, problem.points_world_mm, problem.camera, solver=solver).pose
    assert pose.grad_fn is not None
    pose.sum().backward()
    assert torch.isfinite(landmarks.grad).all() and landmarks.grad.abs().amax() > 0


def test_converged_lbfgs_gradient_agrees_with_implicit():
    # Small poses so that L-BFGS from the identity converges; its curvature pairs
    # are a constant preconditioner, so its derivative tends to the implicit one.
    problem = make_problem(2, seed=27, noise_px=2.0, rotation_deg=10.0, translation_mm=10.0)
    settings = RegistrationSettings(lbfgs=LBFGSSettings(max_iterations=300))

    def grad(solver):
        landmarks = problem.landmarks_px.clone().requires_grad_(True)
        args = (landmarks, problem.weights, problem.points_world_mm, problem.camera)
        result = register(*args, solver=solver, settings=settings)
        result.pose.sum().backward()
        return result, landmarks.grad.flatten()

    lbfgs, lbfgs_grad = grad(Solver.LBFGS)
    lm, lm_grad = grad(Solver.LM)
    assert lbfgs.converged.all()
    torch.testing.assert_close(lbfgs.pose, lm.pose, rtol=0, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(lbfgs_grad, lm_grad, dim=0) > 0.99


def test_analytic_backward_matches_autograd_implicit_function_theorem():
    # Reference: dθ*/dx = -H⁻¹ ∂F/∂x with F = ½∇_θE from autograd in θ coordinates
    # (not the chart the analytic backward uses).
    from ._reference import cost_gradient

    problem, weights = _noisy(3, seed=28, noise_px=4.0, count=8)
    landmarks = problem.landmarks_px.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    points = problem.points_world_mm.clone().requires_grad_(True)
    pose = register(landmarks, w, points, problem.camera, settings=TIGHT).pose
    grad_pose = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    analytic = torch.autograd.grad(pose, (landmarks, w, points), grad_pose)

    theta = pose.detach().requires_grad_(True)
    first_order = cost_gradient(theta, landmarks, w, points, problem.camera, 1e-3)
    basis = torch.eye(6, dtype=F64)[:, None, :].expand(6, 3, 6)
    (rows,) = torch.autograd.grad(first_order, theta, basis, is_grads_batched=True, retain_graph=True)
    hessian = rows.transpose(0, 1)  # [b, k, j] = dF_k/dθ_j
    v = torch.linalg.solve(hessian.transpose(-1, -2), grad_pose)
    reference = torch.autograd.grad(first_order, (landmarks, w, points), -v)
    for ours, theirs in zip(analytic, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * theirs.abs().max())

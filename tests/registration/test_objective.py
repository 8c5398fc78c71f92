"""The analytic Jacobians and Hessian against autograd through geometry.project."""

from __future__ import annotations

import math

import torch
from torch.func import jacrev, vmap

from pelmark import geometry as g
from pelmark.registration import host
from pelmark.registration.objective import weighted_cost

from ._problems import F64, make_problem
from ._reference import (
    chart_jacobian,
    left_jacobian_transpose_apply,
    linearise,
    moving_rows,
    normal_equations,
    project_with_jacobian,
    row_maps,
)


def _poses_with_small_angles(batch: int, seed: int) -> torch.Tensor:
    pose = make_problem(batch, seed).pose_true.clone()
    pose[0, :3] = 0.0  # the Taylor branch at exactly r = 0
    pose[1, :3] = 1e-5  # and just off it
    return pose


def test_theta_jacobian_matches_autograd():
    problem = make_problem(4, seed=0)
    pose = _poses_with_small_angles(4, seed=0)
    _, _, jacobian = project_with_jacobian(problem.points_world_mm, pose, problem.camera, 1e-3)

    def one(p, x):
        return g.project(x[None], p[None], problem.camera)[0]

    reference = vmap(jacrev(one))(pose, problem.points_world_mm)
    assert jacobian.shape == (4, 8, 2, 6)
    torch.testing.assert_close(jacobian, reference, rtol=1e-9, atol=1e-9)


def test_chart_jacobian_matches_autograd_of_left_perturbation():
    problem = make_problem(3, seed=1)
    pose = problem.pose_true

    def perturbed(delta, b):
        rotation = g.rodrigues(delta[:3]) @ g.rodrigues(pose[b, :3])
        moved = torch.cat([g.rotation_to_rotvec(rotation), pose[b, 3:] + delta[3:]])
        return g.project(problem.points_world_mm[b : b + 1], moved[None], problem.camera)[0]

    lin = linearise(problem.points_world_mm, pose, problem.camera, 1e-3)
    jacobian = chart_jacobian(lin)
    for b in range(3):
        reference = torch.autograd.functional.jacobian(lambda d: perturbed(d, b), torch.zeros(6, dtype=F64))
        torch.testing.assert_close(jacobian[b], reference, rtol=1e-8, atol=1e-8)


def test_chart_hessian_is_the_exact_hessian():
    # Noisy landmarks and random weights, so the second-order (residual) terms matter.
    problem = make_problem(3, seed=2, noise_px=5.0)
    pose = problem.pose_true
    weights = torch.rand(3, 8, dtype=F64, generator=torch.Generator().manual_seed(0))

    def half_cost(delta, b):
        rotation = g.rodrigues(delta[:3]) @ g.rodrigues(pose[b, :3])
        moved = torch.cat([g.rotation_to_rotvec(rotation), pose[b, 3:] + delta[3:]])
        error = g.project(problem.points_world_mm[b : b + 1], moved[None], problem.camera) - problem.landmarks_px[b]
        return 0.5 * (weights[b] * error.square().sum(-1)).sum()

    hessian = torch.from_numpy(_host_hessian(problem, pose, weights))
    lin = linearise(problem.points_world_mm, pose, problem.camera, 1e-3)
    for b in range(3):
        reference = torch.autograd.functional.hessian(lambda d: half_cost(d, b), torch.zeros(6, dtype=F64))
        scale = reference.abs().max()
        torch.testing.assert_close(hessian[b] / scale, reference / scale, rtol=0, atol=1e-12)
        # The Gauss-Newton part alone is measurably different here.
        gauss_newton = torch.einsum("lki,lkj,l->ij", chart_jacobian(lin)[b], chart_jacobian(lin)[b], weights[b])
        assert (gauss_newton - reference).abs().max() > 1e-6 * scale


def test_moving_rows_are_the_cross_product_rows():
    # (q × c_k, c_k) with c_k = Σ_m s_m rows[m, k], built the long way.
    generator = torch.Generator().manual_seed(5)
    scales = torch.randn(3, 4, 4, dtype=F64, generator=generator)
    rotated = 100.0 * torch.randn(3, 4, 3, dtype=F64, generator=generator)
    r_ap = g.R_AP
    zero = torch.zeros(3, dtype=F64)
    # The Jacobian's c_k: rows (fx/Z, 0, -(u - cx)/Z) and (0, fy/Z, -(v - cy)/Z) of d(u, v)/dX_cam, times R_AP.
    s_u, s_v, o_u, o_v = scales.unbind(-1)
    c_u = s_u[..., None] * r_ap[0] - o_u[..., None] * r_ap[2]
    c_v = s_v[..., None] * r_ap[1] - o_v[..., None] * r_ap[2]
    expected = torch.stack(
        [torch.cat([torch.linalg.cross(rotated, c, dim=-1), c], dim=-1) for c in (c_u, c_v)], dim=-2
    )
    rows = moving_rows(scales, rotated, row_maps(F64, torch.device("cpu")).jacobian)
    torch.testing.assert_close(rows, expected, rtol=1e-14, atol=1e-12)
    # The curvature map: c = xz R_AP[0] + yz R_AP[1] + ½ zz R_AP[2], and R_AP[2] alone.
    curvature = torch.cat([scales[..., :3], torch.ones_like(scales[..., :1])], dim=-1)
    xz, yz, zz = scales[..., :3].unbind(-1)
    c_a = xz[..., None] * r_ap[0] + yz[..., None] * r_ap[1] + 0.5 * zz[..., None] * r_ap[2]
    c_g = (r_ap[2] + zero).expand_as(c_a)
    expected = torch.stack(
        [torch.cat([torch.linalg.cross(rotated, c, dim=-1), c], dim=-1) for c in (c_a, c_g)], dim=-2
    )
    rows = moving_rows(curvature, rotated, row_maps(F64, torch.device("cpu")).curvature)
    torch.testing.assert_close(rows, expected, rtol=1e-14, atol=1e-12)


def _host_hessian(problem, pose, weights):
    """host.chart_hessian at ``pose``, with its residual terms as host.implicit_vjp forms them."""
    lin = host.linearise(problem.points_world_mm.numpy(), pose.numpy(), problem.camera, 1e-3)
    residual = lin.pixels - problem.landmarks_px.numpy()
    curvature, phi = host.residual_terms(lin, residual)
    return host.chart_hessian(lin, weights.numpy(), curvature, phi)


def test_host_linearisation_is_the_torch_one():
    problem = make_problem(4, seed=7)
    pose = _poses_with_small_angles(4, seed=7)
    ours = host.linearise(problem.points_world_mm.numpy(), pose.numpy(), problem.camera, 1e-3)
    theirs = linearise(problem.points_world_mm, pose, problem.camera, 1e-3)
    for field in theirs.__dataclass_fields__:
        reference = getattr(theirs, field)
        scale = reference.abs().max()
        torch.testing.assert_close(torch.from_numpy(getattr(ours, field)) / scale, reference / scale, rtol=0, atol=1e-14)


def test_host_system_holds_gauss_newton_gradient_and_cost():
    problem = make_problem(4, seed=6, noise_px=3.0)
    weights = torch.rand(4, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    system, pixels, depth = host.evaluate(
        problem.landmarks_px.numpy(),
        host.weight_rows(weights.numpy()),
        problem.points_world_mm.numpy(),
        problem.camera,
        problem.pose_true.numpy(),
        1e-3,
    )
    system = torch.from_numpy(system)
    lin = linearise(problem.points_world_mm, problem.pose_true, problem.camera, 1e-3)
    residual = lin.pixels - problem.landmarks_px
    hessian, gradient = normal_equations(chart_jacobian(lin), residual, weights)
    assert system.shape == (4, 7, 7)
    torch.testing.assert_close(system[:, :6, :6], hessian)
    torch.testing.assert_close(system[:, :6, 6], -gradient)  # it holds -JᵀWe: the descent direction
    torch.testing.assert_close(system[:, 6, :6], -gradient)
    torch.testing.assert_close(system[:, 6, 6], weighted_cost(residual, weights))
    torch.testing.assert_close(torch.from_numpy(pixels), lin.pixels, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(depth), lin.depth_mm, rtol=0, atol=1e-10)


def test_left_jacobian_inverse_and_transpose():
    rotvec = _poses_with_small_angles(5, seed=3)[:, :3]
    v = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    # J_l⁻ᵀ J_lᵀ v = v and J_l J_l⁻¹ v = v.
    def inverse(vectors, transpose=False):
        return torch.from_numpy(host.left_jacobian_inverse_apply(rotvec.numpy(), vectors.numpy(), transpose))

    torch.testing.assert_close(inverse(left_jacobian_transpose_apply(rotvec, v), transpose=True), v)
    columns = [left_jacobian_transpose_apply(rotvec, e.expand(5, 3)) for e in torch.eye(3, dtype=F64)]
    jl = torch.stack(columns, dim=-2)  # row k of J_l is J_lᵀ e_k
    torch.testing.assert_close((jl @ inverse(v)[..., None])[..., 0], v)
    # J_l δ is the rotation increment: R(r + ε δ) ≈ exp(ε [J_l δ]×) R(r).
    eps = 1e-6
    increment = g.rodrigues(rotvec + eps * v) @ g.rodrigues(rotvec).transpose(-1, -2)
    omega = g.rotation_to_rotvec(increment) / eps
    torch.testing.assert_close(omega, (jl @ v[..., None])[..., 0], rtol=1e-5, atol=1e-6)


def test_retract_follows_the_left_perturbation_to_first_order():
    pose = _poses_with_small_angles(4, seed=4)
    step = 1e-6 * torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    moved = torch.from_numpy(host.retract(pose.numpy(), step.numpy()))
    expected = g.rodrigues(step[:, :3]) @ g.rodrigues(pose[:, :3])
    error = (g.rodrigues(moved[:, :3]) - expected).abs().max()
    assert error < 1e-10  # second order in |ω| = 1e-6


def test_wrap_rotation_keeps_the_rotation():
    axis = torch.tensor([[0.6, 0.0, 0.8]], dtype=F64)
    pose = torch.cat([axis * 1.5 * math.pi, torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)], dim=-1)
    wrapped = torch.from_numpy(host.wrap_rotation(pose.numpy()))
    # 1.5π about a = 0.5π about -a; translation untouched.
    torch.testing.assert_close(wrapped[:, :3], -axis * 0.5 * math.pi)
    torch.testing.assert_close(g.rodrigues(wrapped[:, :3]), g.rodrigues(pose[:, :3]))
    torch.testing.assert_close(wrapped[:, 3:], pose[:, 3:])
    small = torch.tensor([[0.1, 0.2, 0.3, 4.0, 5.0, 6.0]], dtype=F64)
    torch.testing.assert_close(torch.from_numpy(host.wrap_rotation(small.numpy())), small)

"""The Levenberg-Marquardt solver's arithmetic in NumPy float64, on the host.

The solve needs no gradient (see :mod:`pelmark.registration.implicit`) and works on
a few hundred numbers per batch, so its cost is the number of calls, not their
arithmetic: about 600 per solve. A NumPy call on arrays this small costs a
fraction of a torch call (no dispatcher, no autograd or device checks), so the
solver runs here whatever the inputs' device: on a CPU it is the cheaper
interpreter, and on a GPU it replaces hundreds of tiny kernel launches and a host
read per iteration with one copy each way.

Each function is the NumPy twin of a torch function, with the same formulas in
the same order; the tests check each against its twin:

* :func:`evaluate`: :func:`pelmark.registration.objective.normal_system` of
  :func:`~pelmark.registration.objective.linearise` (projection through
  :func:`pelmark.geometry.project_host`);
* :func:`retract`: :func:`pelmark.registration.objective.retract`;
* :func:`wrap_rotation`: :func:`pelmark.registration.objective.wrap_rotation`.

The torch functions stay the reference: the implicit backward and the unrolled
solvers use them on the inputs' device, and autograd checks them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from pelmark.geometry import R_AP, Camera, project_host, rodrigues_host
from pelmark.registration.objective import row_maps

# Below this |r|² J_l⁻¹'s coefficient uses its series (as objective._inverse_coefficient).
_SMALL_ANGLE2 = 1e-6


class _Constants(NamedTuple):
    jacobian_rows: np.ndarray  # (16, 12): objective.row_maps' map for J_δ
    curvature_rows: np.ndarray  # (16, 12): its map for the rows a and G_z of the Hessian
    r_ap: np.ndarray  # (3, 3) geometry.R_AP
    curvature_scale: np.ndarray  # (-1, -1, 2): see implicit_vjp
    force_map: np.ndarray  # diag(1, 1, -1) R_AP: see implicit_vjp
    pair_scale: np.ndarray  # (6, 1): ½ on the φ and q rows of the Hessian's product
    partner: np.ndarray  # the row each Hessian row is multiplied with


@functools.lru_cache(maxsize=1)
def _constants() -> _Constants:
    maps = row_maps(torch.float64, torch.device("cpu"))
    r_ap = R_AP.numpy().copy()
    return _Constants(
        jacobian_rows=maps.jacobian.numpy().copy(),
        curvature_rows=maps.curvature.numpy().copy(),
        r_ap=r_ap,
        curvature_scale=np.array([-1.0, -1.0, 2.0]),
        force_map=r_ap * np.array([[1.0], [1.0], [-1.0]]),
        pair_scale=np.array([[1.0], [1.0], [1.0], [1.0], [0.5], [0.5]]),
        partner=np.array([0, 1, 3, 2, 5, 4]),
    )


class Linearisation(NamedTuple):
    """:class:`pelmark.registration.objective.Linearisation` in NumPy (the same fields)."""

    pixels: np.ndarray
    depth_mm: np.ndarray
    rotated_mm: np.ndarray
    focal_per_depth: np.ndarray
    offset_per_depth: np.ndarray
    jacobian: np.ndarray
    unclamped_inverse_depth: np.ndarray


def linearise(points_world_mm: np.ndarray, pose: np.ndarray, camera: Camera, min_depth_mm: float) -> Linearisation:
    """Pixels, depths and the chart Jacobian J_δ (B, L, 2, 6) at ``pose``: the twin of
    :func:`pelmark.registration.objective.linearise`."""
    pixels, depth, rotated = project_host(points_world_mm, pose, camera, min_depth_mm)
    depth_1 = depth[..., None]
    inverse_z = 1.0 / np.maximum(depth_1, min_depth_mm)
    unclamped_inverse_z = np.where(depth_1 > min_depth_mm, inverse_z, 0.0)
    focal, centre = camera_focal_centre(camera)
    along = focal * inverse_z
    against_depth = (pixels - centre) * unclamped_inverse_z
    scales = np.concatenate([along, against_depth], axis=-1)
    return Linearisation(
        pixels=pixels,
        depth_mm=depth,
        rotated_mm=rotated,
        focal_per_depth=along,
        offset_per_depth=against_depth,
        jacobian=moving_rows(scales, rotated, _constants().jacobian_rows),
        unclamped_inverse_depth=unclamped_inverse_z,
    )


def moving_rows(scales: np.ndarray, rotated_mm: np.ndarray, row_map: np.ndarray) -> np.ndarray:
    """(B, L, 2, 6) rows (q × c_k, c_k) from coefficients s (B, L, 4) and q (B, L, 3): the twin of
    :func:`pelmark.registration.objective.moving_rows`."""
    batch, count = scales.shape[:2]
    outer = np.concatenate([(scales[..., :, None] * rotated_mm[..., None, :]).reshape(batch, count, 12), scales], -1)
    return (outer @ row_map).reshape(batch, count, 2, 6)


def evaluate(
    landmarks_px: np.ndarray,
    weight_rows: np.ndarray,
    points_world_mm: np.ndarray,
    camera: Camera,
    pose: np.ndarray,
    min_depth_mm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At ``pose``: [J | -e]ᵀ W [J | -e] (B, 7, 7), pixels (B, L, 2) and unclamped depths (B, L).

    The system holds JᵀWJ (top-left), -JᵀWe (the last column's first six entries) and
    the cost eᵀWe (the last entry), with e = π(θ) - l in the chart δ = (ω, τ): the twin of
    :func:`pelmark.registration.objective.normal_system`.

    Args:
        landmarks_px: (B, L, 2) detections.
        weight_rows: (B, 2L, 1) each landmark's weight twice, once per pixel row
            (:func:`weight_rows`).
        points_world_mm: (B, L, 3) world points.
        camera: the detector and nominal C-arm.
        pose: (B, 6) poses θ.
        min_depth_mm: depth clamp.
    """
    lin = linearise(points_world_mm, pose, camera, min_depth_mm)
    batch, count = lin.pixels.shape[:2]
    augmented = np.concatenate([lin.jacobian, (landmarks_px - lin.pixels)[..., None]], axis=-1)
    augmented = augmented.reshape(batch, 2 * count, 7)
    return (augmented * weight_rows).transpose(0, 2, 1) @ augmented, lin.pixels, lin.depth_mm


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A detached copy (or, on the CPU, a view) of a tensor as a NumPy array: float64 for floats."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype=torch.float64)
    return tensor.cpu().numpy()


def rms_residual_px(residual_px: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted RMS reprojection error per sample, sqrt(Σ w |e|² / Σ w); 0 where Σ w = 0."""
    total = weights.sum(-1)
    mean_square = weighted_cost(residual_px, weights) / np.maximum(total, np.finfo(np.float64).tiny)
    return np.sqrt(np.where(total > 0, mean_square, 0.0))


def is_definite(matrix: np.ndarray) -> np.ndarray:
    """(B,) whether each (n, n) matrix has a Cholesky factor (torch's batched test, as in
    :func:`solve_definite`)."""
    with torch.inference_mode():
        _, info = torch.linalg.cholesky_ex(torch.from_numpy(matrix))
    return info.numpy() == 0


@functools.lru_cache(maxsize=32)
def camera_focal_centre(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """(fx, fy) and (cx, cy) in float64."""
    return np.array([camera.fx, camera.fy]), np.array([camera.cx_px, camera.cy_px])


def solve_general(matrix: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (B, n) with matrix x = rhs by LU, and (B,) where the matrix was not singular (as
    :func:`solve_definite`, through torch on the same memory)."""
    with torch.inference_mode():
        solution, info = torch.linalg.solve_ex(torch.from_numpy(matrix), torch.from_numpy(rhs))
    return solution.numpy(), info.numpy() == 0


def solve_definite(matrix: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (B, n) with matrix x = rhs by Cholesky, and (B,) where the matrix was positive definite.

    Where it was not, x holds whatever the failed factor gives (the caller masks it). This
    one step goes through torch on the same memory: its batched factorisation reports a
    failure per matrix where NumPy's raises for the whole batch, and on these sizes its two
    calls cost less than NumPy's.
    """
    with torch.inference_mode():
        factor, info = torch.linalg.cholesky_ex(torch.from_numpy(matrix))
        solution = torch.cholesky_solve(torch.from_numpy(rhs[..., None]), factor)
    return solution.numpy()[..., 0], info.numpy() == 0


def weight_rows(weights: np.ndarray) -> np.ndarray:
    """(B, 2L, 1) each landmark's weight on both of its pixel rows, for :func:`evaluate`."""
    return np.repeat(weights, 2, axis=1)[..., None]


def weighted_cost(residual_px: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_i w_i |e_i|² per sample (B,)."""
    return (weights * (residual_px * residual_px).sum(-1)).sum(-1)


def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a × b along the last axis (np.cross costs several times more on arrays this small)."""
    return a[..., [1, 2, 0]] * b[..., [2, 0, 1]] - a[..., [2, 0, 1]] * b[..., [1, 2, 0]]


def retract(pose: np.ndarray, step: np.ndarray) -> np.ndarray:
    """θ moved by a chart step δ = (ω, τ): (r + J_l(r)⁻¹ ω, t + τ).

    J_l⁻¹ ω = ω - ½ r × ω + d r × (r × ω), d = (1 - (θ/2) cot(θ/2))/θ², its series below
    |r|² = 1e-6.
    """
    rotvec, omega = pose[:, :3], step[:, :3]
    r_cross = cross(rotvec, omega)
    moved = omega - 0.5 * r_cross + _inverse_coefficient(rotvec)[:, None] * cross(rotvec, r_cross)
    return pose + np.concatenate([moved, step[:, 3:]], axis=-1)


def wrap_rotation(pose: np.ndarray) -> np.ndarray:
    """The same rigid motions with |r| ≤ π."""
    rotvec = pose[:, :3]
    angle = np.sqrt((rotvec * rotvec).sum(-1, keepdims=True))
    wrapped = np.remainder(angle + math.pi, 2.0 * math.pi) - math.pi
    scale = np.where(angle > math.pi, wrapped / np.maximum(angle, math.pi), 1.0)
    return np.concatenate([rotvec * scale, pose[:, 3:]], axis=-1)


def implicit_vjp(
    grad_pose: np.ndarray,
    solution: np.ndarray,
    landmarks_px: np.ndarray,
    weights: np.ndarray,
    points_world_mm: np.ndarray,
    keep: np.ndarray,
    camera: Camera,
    min_depth_mm: float,
    wanted: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Gradients of a loss with respect to (landmarks_px, weights, points_world_mm), -H⁻¹ ∂F/∂x.

    See :mod:`pelmark.registration.implicit` for the derivation; this is its arithmetic.

    Args:
        grad_pose: (B, 6) ∂L/∂θ*.
        solution: (B, 6) θ*, a stationary point of the cost.
        landmarks_px: (B, L, 2).
        weights: (B, L).
        points_world_mm: (B, L, 3).
        keep: (B,) samples whose gradient is computed; the others get zeros.
        camera: the detector and nominal C-arm.
        min_depth_mm: depth clamp.
        wanted: which of the three gradients to compute (the others are None).

    Returns:
        (B, L, 2), (B, L) and (B, L, 3) gradients, or None where not wanted.
    """
    const = _constants()
    lin = linearise(points_world_mm, solution, camera, min_depth_mm)
    residual = lin.pixels - landmarks_px
    # The projection's curvature along the residual and the residual's force, both linear in
    # (e_f, e_o) = (e_u fx/Z, e_v fy/Z, e_u (u - cx)/Z + e_v (v - cy)/Z): see implicit._residual_terms.
    e_f = residual * lin.focal_per_depth
    e_o = (residual * lin.offset_per_depth).sum(-1, keepdims=True)
    terms = np.concatenate([e_f, e_o], axis=-1)
    curvature = terms * (lin.unclamped_inverse_depth * const.curvature_scale)
    phi = terms @ const.force_map
    hessian = chart_hessian(lin, weights, curvature, phi)

    # Aᵀ ∂L/∂θ with A = ∂θ/∂δ = diag(J_l⁻¹, I): J_l⁻ᵀ ω = ω + ½ r × ω + d r × (r × ω).
    rotvec, grad_rotation = solution[:, :3], grad_pose[:, :3]
    r_cross = cross(rotvec, grad_rotation)
    rhs_rotation = grad_rotation + 0.5 * r_cross + _inverse_coefficient(rotvec)[:, None] * cross(rotvec, r_cross)
    rhs = np.concatenate([rhs_rotation, grad_pose[:, 3:]], axis=-1)
    u, solved = solve_general(np.where(keep[:, None, None], hessian, np.eye(6)), rhs)
    ok = keep & solved & np.isfinite(u).all(-1)

    # J_δ u: how each landmark's pixel moves along u.
    batch, count = weights.shape
    moved_px = (lin.jacobian.reshape(batch, 2 * count, 6) @ u[..., None]).reshape(residual.shape)
    grad_landmarks = weights[..., None] * moved_px if wanted[0] else None
    grad_weights = -(moved_px * residual).sum(-1) if wanted[1] else None
    grad_points = None
    if wanted[2]:
        # d/dp of -(J_δ u)·e: through the pixel, the projection's curvature and the rotated point's velocity.
        u_omega, u_tau = u[:, None, :3], u[:, None, 3:]
        velocity_camera = (cross(np.broadcast_to(u_omega, lin.rotated_mm.shape), lin.rotated_mm) + u_tau) @ const.r_ap.T
        xz, yz, zz = curvature[..., 0], curvature[..., 1], curvature[..., 2]
        v_x, v_y, v_z = velocity_camera[..., 0], velocity_camera[..., 1], velocity_camera[..., 2]
        curved = np.stack([xz * v_z, yz * v_z, xz * v_x + yz * v_y + zz * v_z], axis=-1)
        world = (
            (lin.jacobian[..., 3:].transpose(0, 1, 3, 2) @ moved_px[..., None])[..., 0]
            + curved @ const.r_ap
            + cross(phi, np.broadcast_to(u_omega, phi.shape))
        )
        grad_points = -weights[..., None] * (world @ rodrigues_host(rotvec))

    # Zero for samples not ok, whatever u and the intermediates (possibly non-finite) were there.
    return tuple(
        None if grad is None else np.where(ok.reshape(-1, *([1] * (grad.ndim - 1))), grad, 0.0)
        for grad in (grad_landmarks, grad_weights, grad_points)
    )


def chart_hessian(lin: Linearisation, weights: np.ndarray, curvature: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Exact Hessian (B, 6, 6) of ½ Σ w |e|² in the chart δ = (ω, τ): the twin of
    :func:`pelmark.registration.implicit.chart_hessian` (see there for the formula)."""
    const = _constants()
    q = lin.rotated_mm
    batch, count = weights.shape
    a_g_z = moving_rows(np.concatenate([curvature, np.ones((batch, count, 1))], axis=-1), q, const.curvature_rows)
    phi_q = np.concatenate([np.stack([phi, q], axis=-2), np.zeros((batch, count, 2, 3))], axis=-1)
    rows = np.concatenate([lin.jacobian, a_g_z, phi_q], axis=-2)  # (B, L, 6, 6)
    weighted = (rows * (weights[..., None, None] * const.pair_scale)).reshape(batch, 6 * count, 6)
    hessian = weighted.transpose(0, 2, 1) @ rows[:, :, const.partner].reshape(batch, 6 * count, 6)
    trace = (weights * (phi * q).sum(-1)).sum(-1)
    hessian[:, range(3), range(3)] -= trace[:, None]
    return hessian


def _inverse_coefficient(rotvec: np.ndarray) -> np.ndarray:
    """d = (1 - (θ/2) cot(θ/2))/θ² of J_l⁻¹ = I - ½K + dK², its series below |r|² = 1e-6."""
    theta2 = (rotvec * rotvec).sum(-1)
    theta2_safe = np.maximum(theta2, _SMALL_ANGLE2)
    half = np.sqrt(theta2_safe) / 2.0
    return np.where(theta2 < _SMALL_ANGLE2, theta2 / 720.0 + 1.0 / 12.0, (1.0 - half / np.tan(half)) / theta2_safe)

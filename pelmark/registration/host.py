"""The registration layer's arithmetic in NumPy float64, on the host.

The LM solve, its closed-form start, the checks at the solution and the
implicit backward need no autograd (see :mod:`pelmark.registration.implicit`),
and each works on a few hundred numbers per batch, so their cost is the number
of calls, not their arithmetic: about a thousand per forward and backward. A
NumPy call on arrays this small costs less than a torch dispatch, so this
arithmetic runs here whatever the inputs' device. On a CPU that is the cheaper
interpreter; on a GPU it replaces about a thousand tiny kernel launches and a
host read per LM iteration with one copy of the problem each way.

Jacobian. Pixels come from :func:`pelmark.geometry.project_host` (the
arithmetic of :func:`pelmark.geometry.project`). With q = R(r) p (the rotated
point before the translation), the moved point is p' = q + t, the camera point
X_cam = R_AP p' + (0, 0, sid), and u = fx X/Z + cx, v = fy Y/Z + cy with Z the
clamped depth, whose derivative is 0 where the clamp is active (as autograd's).

Local chart. For the motion R = exp([ω]×) R(r), t + τ the Jacobian is simply
(-[q]×, I): LM steps in δ = (ω, τ) and maps them back to θ with the
retraction r + J_l(r)⁻¹ ω (J_l the left Jacobian of SO(3)), which has the same
first-order model, so the same convergence. A row (q × c, c) of the chart
Jacobian is bilinear in per-landmark coefficients s and (q, 1), so all rows
come from one product with a constant (:func:`moving_rows`, :func:`row_maps`);
JᵀWJ, JᵀWe and the cost come from another (:func:`evaluate`), and the exact
Hessian of the implicit backward from a third (:func:`chart_hessian`).

The tests check every piece against autograd through
:func:`pelmark.geometry.project` and against a differentiable torch twin
(``tests/registration/_reference.py``).

Two linear-algebra steps (:func:`solve_definite`, :func:`solve_general`) go
through torch on the same memory: its batched factorisations report a failure
per matrix where NumPy's raise for the whole batch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from pelmark.geometry import R_AP, Camera, project_host, rodrigues_host

# Below this |r|² J_l⁻¹'s coefficient uses its series: the closed form cancels catastrophically.
_SMALL_ANGLE2 = 1e-6


class RowMaps(NamedTuple):
    """Constant maps of :func:`moving_rows`, built once by :func:`row_maps`."""

    jacobian: np.ndarray  # (16, 12): s = (fx/Z, fy/Z, (u - cx)/Z, (v - cy)/Z) to the rows of J_δ
    curvature: np.ndarray  # (16, 12): s = (xz, yz, zz, 1) to the rows a and G_z of the Hessian


@functools.lru_cache(maxsize=1)
def row_maps() -> RowMaps:
    """The :class:`RowMaps` (float64; treat them as read-only)."""
    r_ap, zero = R_AP.numpy(), np.zeros(3)
    # Row k of d(u, v)/dp' is c_k = s_k R_AP[k] - s_{2+k} R_AP[2].
    jacobian = np.array([[r_ap[0], zero], [zero, r_ap[1]], [-r_ap[2], zero], [zero, -r_ap[2]]])
    # a has c = xz R_AP[0] + yz R_AP[1] + ½ zz R_AP[2] and G_z has c = R_AP[2] (see chart_hessian).
    curvature = np.array([[r_ap[0], zero], [r_ap[1], zero], [0.5 * r_ap[2], zero], [zero, r_ap[2]]])
    return RowMaps(jacobian=_moving_row_map(jacobian), curvature=_moving_row_map(curvature))


def _moving_row_map(rows: np.ndarray) -> np.ndarray:
    """(16, 12) M with (s ⊗ q, s) M = the rows (q × c_k, c_k), k = 0, 1, for c_k = Σ_m s_m rows[m, k].

    Such a row, the derivative of a linear function c_kᵀ p' of the moved point
    p' = exp([ω]×) q + t + τ along the chart δ = (ω, τ), is bilinear in s and
    (q, 1): row 3m + n of M is the pair for s = e_m and q = e_n (its moment
    q × c_k), row 12 + m the pair for s = e_m alone (its force c_k).

    Args:
        rows: (4, 2, 3) c_k for s = e_m.
    """
    shape = (4, 3, 2, 3)
    per_omega = cross(np.broadcast_to(np.eye(3)[None, :, None, :], shape), np.broadcast_to(rows[:, None], shape))
    moment = np.concatenate([per_omega, np.zeros_like(per_omega)], axis=-1)  # q = e_n
    force = np.concatenate([np.zeros_like(rows), rows], axis=-1)  # the s terms alone
    return np.concatenate([moment.reshape(12, 12), force.reshape(4, 12)])


class _Constants(NamedTuple):
    jacobian_rows: np.ndarray  # (16, 12): row_maps().jacobian
    curvature_rows: np.ndarray  # (16, 12): its map for the rows a and G_z of the Hessian
    r_ap: np.ndarray  # (3, 3) geometry.R_AP
    curvature_scale: np.ndarray  # (-1, -1, 2): see residual_terms
    force_map: np.ndarray  # diag(1, 1, -1) R_AP: see residual_terms
    pair_scale: np.ndarray  # (6, 1): ½ on the φ and q rows of the Hessian's product
    partner: np.ndarray  # the row each Hessian row is multiplied with


@functools.lru_cache(maxsize=1)
def _constants() -> _Constants:
    maps = row_maps()
    r_ap = R_AP.numpy().copy()
    return _Constants(
        jacobian_rows=maps.jacobian,
        curvature_rows=maps.curvature,
        r_ap=r_ap,
        curvature_scale=np.array([-1.0, -1.0, 2.0]),
        force_map=r_ap * np.array([[1.0], [1.0], [-1.0]]),
        pair_scale=np.array([[1.0], [1.0], [1.0], [1.0], [0.5], [0.5]]),
        partner=np.array([0, 1, 3, 2, 5, 4]),
    )


class Linearisation(NamedTuple):
    """First-order pieces of the projection at a pose, per landmark.

    Attributes:
        pixels: (B, L, 2); depth_mm: (B, L) unclamped; rotated_mm: (B, L, 3) q = R(r) p.
        focal_per_depth: (B, L, 2) (fx/Z, fy/Z), Z the clamped depth.
        offset_per_depth: (B, L, 2) ((u - cx)/Z, (v - cy)/Z) where the clamp is inactive, else 0.
        jacobian: (B, L, 2, 6) d(u, v)/dδ in the chart δ = (ω, τ).
        unclamped_inverse_depth: (B, L, 1) 1/Z where the clamp is inactive, else 0.
    """

    pixels: np.ndarray
    depth_mm: np.ndarray
    rotated_mm: np.ndarray
    focal_per_depth: np.ndarray
    offset_per_depth: np.ndarray
    jacobian: np.ndarray
    unclamped_inverse_depth: np.ndarray


def linearise(points_world_mm: np.ndarray, pose: np.ndarray, camera: Camera, min_depth_mm: float) -> Linearisation:
    """Pixels, depths and the chart Jacobian J_δ (B, L, 2, 6) at ``pose``, projecting once."""
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
    """(B, L, 2, 6) rows (q × c_k, c_k) from coefficients s (B, L, 4) and q (B, L, 3) and a map of
    :func:`row_maps`: one product with a constant instead of cross products."""
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
    the cost eᵀWe (the last entry), with e = π(θ) - l in the chart δ = (ω, τ).

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


def left_jacobian_inverse_apply(rotvec: np.ndarray, vectors: np.ndarray, transpose: bool = False) -> np.ndarray:
    """J_l(r)⁻¹ v = v - ½ r × v + d r × (r × v) (or J_l⁻ᵀ v, with +½) for r, v (B, 3), with
    d = (1 - (θ/2) cot(θ/2))/θ² (its series below |r|² = 1e-6)."""
    r_cross = cross(rotvec, vectors)
    half = 0.5 if transpose else -0.5
    return vectors + half * r_cross + _inverse_coefficient(rotvec)[:, None] * cross(rotvec, r_cross)


def retract(pose: np.ndarray, step: np.ndarray) -> np.ndarray:
    """θ moved by a chart step δ = (ω, τ): (r + J_l(r)⁻¹ ω, t + τ), exact to first order."""
    moved = left_jacobian_inverse_apply(pose[:, :3], step[:, :3])
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
    curvature, phi = residual_terms(lin, residual)
    hessian = chart_hessian(lin, weights, curvature, phi)

    # Aᵀ ∂L/∂θ with A = ∂θ/∂δ = diag(J_l⁻¹, I): J_l⁻ᵀ ω = ω + ½ r × ω + d r × (r × ω).
    rotvec = solution[:, :3]
    rhs = np.concatenate([left_jacobian_inverse_apply(rotvec, grad_pose[:, :3], transpose=True), grad_pose[:, 3:]], -1)
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


def residual_terms(lin: Linearisation, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projection's curvature along the residual and the residual's force, each (B, L, 3).

    Both are linear in (e_f, e_o) = (e_u fx/Z, e_v fy/Z, e_u (u - cx)/Z + e_v (v - cy)/Z),
    the last 0 where the depth clamp is active, so they share its two products:

    * (xz, yz, zz) = (-e_f, 2 e_o)/Z (0 where clamped), the non-zero entries of
      M = Σ_k e_k ∇²_X π_k = [[0, 0, xz], [0, 0, yz], [xz, yz, zz]] in camera
      coordinates (xz = -e_u fx/Z², yz = -e_v fy/Z², zz = 2 (e_u fx X + e_v fy Y)/Z³);
    * φ = (∂π/∂p')ᵀ e = R_APᵀ (∂π/∂X_cam)ᵀ e = R_APᵀ (e_f, -e_o), the residual pulled back
      to the moved point (rows of ∂π/∂X_cam: (fx/Z, 0, -(u - cx)/Z), (0, fy/Z, -(v - cy)/Z)).

    Args:
        lin: the linearisation at the solution.
        residual: (B, L, 2) π(θ*) - l.
    """
    const = _constants()
    e_f = residual * lin.focal_per_depth
    e_o = (residual * lin.offset_per_depth).sum(-1, keepdims=True)
    terms = np.concatenate([e_f, e_o], axis=-1)
    return terms * (lin.unclamped_inverse_depth * const.curvature_scale), terms @ const.force_map


def chart_hessian(lin: Linearisation, weights: np.ndarray, curvature: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Exact Hessian (B, 6, 6) of ½ Σ w |e|² in the local chart δ = (ω, τ).

    H = Σ_i w_i [J_iᵀ J_i + G_iᵀ M_i G_i] + (rotation block) ½(S + Sᵀ) - tr(S) I,
    with G = dX_cam/dδ, M the projection curvature and S = Σ w φ qᵀ.

    G = dX_cam/dδ = R_AP [-[q]× | I] (B, L, 3, 6): row m is (q × R_AP[m], R_AP[m]), linear in
    R_AP[m]. Gᵀ M G = a ⊗ G_z + G_z ⊗ a with a = xz G_x + yz G_y + ½ zz G_z, so a is the row of
    c = xz R_AP[0] + yz R_AP[1] + ½ zz R_AP[2]; a and G_z come from one product (moving_rows).
    All of H but the trace term is then one product Σ_i w_i Σ_rows x ⊗ y over rows per
    landmark: J_u ⊗ J_u + J_v ⊗ J_v (Gauss-Newton), a ⊗ G_z + G_z ⊗ a (projection curvature)
    and ½(φ ⊗ q + q ⊗ φ) in the rotation block, the symmetric part of S. The rows x are
    (J_u, J_v, a, G_z, ½(φ, 0), ½(q, 0)) and the rows y the same without the halves and with
    each pair but J's swapped.

    Args:
        lin: the linearisation at θ*.
        weights: (B, L).
        curvature: (B, L, 3) and phi (B, L, 3): :func:`residual_terms`.
    """
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

"""Implicit differentiation of the registration solution, with an exact analytic Hessian.

At a solution θ*(x) of min_θ E(θ; x), x = (landmarks, weights, 3D points), the
first-order condition F(θ*, x) = ½ ∇_θ E = Jᵀ W e = 0 holds for all x near by,
so by the implicit function theorem

    dθ*/dx = -H⁻¹ ∂F/∂x,     H = ∂F/∂θ = JᵀWJ + Σ_i w_i Σ_k e_ik ∇²π_ik.

H is the *exact* Hessian of ½E, not the Gauss-Newton JᵀWJ: the second term
vanishes only when the residuals do, and a network's detections never fit
exactly, so JᵀWJ would give a biased gradient (gradcheck catches it). The
backward solves one 6x6 system per sample; nothing is backpropagated through
the solver's iterations.

Local chart. The Hessian is formed in the coordinates δ = (ω, τ) of the motion
R = exp([ω]×) R(r*), t = t* + τ, where second derivatives are short:

* the perspective division, u = fx X/Z: ∂²u/∂X∂Z = -fx/Z², ∂²u/∂Z² = 2 fx X/Z³
  (and the same for v), collected as M = Σ_k e_k ∇²_X π_k;
* the rotation, ∂²(exp([ω]×) q)_m/∂ω_a∂ω_b = ½(δ_ma q_b + δ_mb q_a) - q_m δ_ab,
  contracted with φ = (∂π/∂p')ᵀ e.

Since θ = (log(exp([ω]×) R(r*)), t* + τ) has ∂θ/∂δ = A = diag(J_l(r*)⁻¹, I),
and the Hessians of the two parameterisations agree up to a term proportional
to ∇E (zero at the solution), dθ*/dx = A dδ*/dx: the backward solves
H_δ u = Aᵀ ∂L/∂θ* and returns -uᵀ ∂F_δ/∂x, written out for landmarks, weights
and points below. The tests check all of it against autograd and gradcheck.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pelmark.geometry import R_AP, Camera, rodrigues
from pelmark.registration.objective import (
    Linearisation,
    left_jacobian_inverse_apply,
    linearise,
    moving_rows,
    row_maps,
)
from pelmark.registration import host
from pelmark.registration.threads import small_problem_threads


class ImplicitPose(torch.autograd.Function):
    """Identity on the solution in the forward; -H⁻¹ ∂F/∂x in the backward.

    Forward args: ``solution`` (B, 6) float64 (no gradient of its own),
    ``landmarks_px`` (B, L, 2), ``weights`` (B, L), ``points_world_mm`` (B, L, 3),
    all float64, ``keep`` (B,) bool (samples with a trustworthy solution),
    ``camera``, ``min_depth_mm``. Samples not kept get exactly zero gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        solution: Tensor,
        landmarks_px: Tensor,
        weights: Tensor,
        points_world_mm: Tensor,
        keep: Tensor,
        camera: Camera,
        min_depth_mm: float,
    ) -> Tensor:
        ctx.save_for_backward(solution, landmarks_px, weights, points_world_mm, keep)
        ctx.camera = camera
        ctx.min_depth_mm = min_depth_mm
        return solution.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_pose: Tensor) -> tuple[Tensor | None, ...]:
        solution, landmarks_px, weights, points_world_mm, keep = ctx.saved_tensors
        device = solution.device
        # The arithmetic runs in NumPy on the host, as the solve did (see registration.host).
        arrays = [x.detach().cpu().numpy() for x in (grad_pose.to(solution.dtype), solution, landmarks_px, weights, points_world_mm, keep)]
        with small_problem_threads(torch.device("cpu"), weights.numel()), np.errstate(all="ignore"):
            grads = host.implicit_vjp(*arrays, ctx.camera, ctx.min_depth_mm, wanted=tuple(ctx.needs_input_grad[1:4]))
        # Fresh tensors: autograd may keep one as a leaf's .grad and add to it in place.
        return (None, *(None if grad is None else torch.from_numpy(grad).to(device) for grad in grads), None, None, None)


def implicit_vjp(
    grad_pose: Tensor,
    solution: Tensor,
    landmarks_px: Tensor,
    weights: Tensor,
    points_world_mm: Tensor,
    keep: Tensor,
    camera: Camera,
    min_depth_mm: float,
    wanted: tuple[bool, ...] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a loss with respect to (landmarks_px, weights, points_world_mm).

    Args:
        grad_pose: (B, 6) ∂L/∂θ*.
        solution: (B, 6) θ*, a stationary point of the cost.
        landmarks_px: (B, L, 2) float64.
        weights: (B, L) float64.
        points_world_mm: (B, L, 3) float64.
        keep: (B,) samples whose gradient is computed; the others get zeros.
        camera: the detector and nominal C-arm.
        min_depth_mm: depth clamp.
        wanted: which of the three gradients to compute (the others are None).

    Returns:
        (B, L, 2), (B, L) and (B, L, 3) gradients, or None where not wanted.
    """
    dtype = solution.dtype
    grad_pose = grad_pose.to(dtype)
    lin = linearise(points_world_mm, solution, camera, min_depth_mm)
    residual = lin.pixels - landmarks_px
    curvature, phi = _residual_terms(lin, residual)
    hessian = chart_hessian(lin, residual, weights, curvature, phi)
    # Aᵀ ∂L/∂θ with A = ∂θ/∂δ = diag(J_l⁻¹, I).
    grad_rotation, grad_translation = grad_pose.narrow(-1, 0, 3), grad_pose.narrow(-1, 3, 3)
    rhs_rotation = left_jacobian_inverse_apply(solution[:, :3], grad_rotation, transpose=True)
    rhs = torch.cat([rhs_rotation, grad_translation], dim=-1)
    keep_3d = keep.view(-1, 1, 1)
    u, info = torch.linalg.solve_ex(torch.where(keep_3d, hessian, _constants(dtype, solution.device).eye6), rhs)
    # u of a sample not ok is left as it came out: every gradient is masked with ok at the end.
    ok = keep & info.logical_not() & torch.isfinite(u).all(-1)

    # J_δ u: how each landmark's pixel moves along u (one batched product over all landmarks).
    moved_px = torch.bmm(lin.jacobian.flatten(1, 2), u.unsqueeze(-1)).view(residual.shape)
    grad_landmarks = weights.unsqueeze(-1) * moved_px if wanted[0] else None
    grad_weights = -(moved_px * residual).sum(-1) if wanted[1] else None
    grad_points = None
    if wanted[2]:
        # d/dp of -(J_δ u)·e: through the pixel, the projection's curvature and the rotated point's velocity.
        u_omega, u_tau = u[:, None, :3], u[:, None, 3:]
        r_ap = R_AP.to(dtype=dtype, device=solution.device)
        velocity_world = torch.linalg.cross(u_omega.expand_as(lin.rotated_mm), lin.rotated_mm, dim=-1) + u_tau
        velocity_camera = velocity_world @ r_ap.T
        world = (
            (lin.pixel_per_world.transpose(-1, -2) @ moved_px[..., None])[..., 0]
            + _curvature_apply(curvature, velocity_camera) @ r_ap
            + torch.linalg.cross(phi, u_omega.expand_as(phi), dim=-1)
        )
        grad_points = -weights[..., None] * (world @ rodrigues(solution[:, :3]))

    # Zero for samples not ok, whatever u and the intermediates (possibly non-finite) were there.
    grads = (grad_landmarks, grad_weights, grad_points)
    return tuple(None if grad is None else _zero_unless(ok, grad) for grad in grads)


class _Constants(NamedTuple):
    eye6: Tensor
    partner: Tensor  # (6,) int64: the row :func:`chart_hessian` multiplies each of its rows with
    pair_scale: Tensor  # (6, 1): the factor on each row's product there (½ for the φ and q rows)
    curvature_scale: Tensor  # (3,) (-1, -1, 2): see _residual_terms
    force_map: Tensor  # (3, 3) diag(1, 1, -1) R_AP: see _residual_terms


@functools.lru_cache(maxsize=8)
def _constants(dtype: torch.dtype, device: torch.device) -> _Constants:
    # Ordinary tensors even when first asked for under inference mode (as objective.row_maps).
    with torch.inference_mode(False):
        r_ap = R_AP.to(dtype=dtype, device=device)
        return _Constants(
            eye6=torch.eye(6, dtype=dtype, device=device),
            partner=torch.tensor([0, 1, 3, 2, 5, 4], device=device),
            pair_scale=torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.5], [0.5]], dtype=dtype, device=device),
            curvature_scale=torch.tensor([-1.0, -1.0, 2.0], dtype=dtype, device=device),
            force_map=r_ap * torch.tensor([[1.0], [1.0], [-1.0]], dtype=dtype, device=device),
        )


def _zero_unless(ok: Tensor, grad: Tensor) -> Tensor:
    return torch.where(ok.view(-1, *([1] * (grad.ndim - 1))), grad, 0.0)


def _residual_terms(lin: Linearisation, residual: Tensor) -> tuple[Tensor, Tensor]:
    """The projection's curvature along the residual and the residual's force, each (B, L, 3).

    Both are linear in (e_f, e_o) = (e_u fx/Z, e_v fy/Z, e_u (u - cx)/Z + e_v (v - cy)/Z),
    the last 0 where the depth clamp is active, so they share its two products:

    * (xz, yz, zz) = (-e_f, 2 e_o)/Z (0 where clamped), the non-zero entries of
      M = Σ_k e_k ∇²_X π_k = [[0, 0, xz], [0, 0, yz], [xz, yz, zz]] in camera
      coordinates (xz = -e_u fx/Z², yz = -e_v fy/Z², zz = 2 (e_u fx X + e_v fy Y)/Z³);
    * φ = (∂π/∂p')ᵀ e = R_APᵀ (∂π/∂X_cam)ᵀ e = R_APᵀ (e_f, -e_o), the residual pulled back
      to the moved point (rows of ∂π/∂X_cam: (fx/Z, 0, -(u - cx)/Z), (0, fy/Z, -(v - cy)/Z)).
    """
    const = _constants(residual.dtype, residual.device)
    e_f = residual * lin.focal_per_depth
    e_o = (residual * lin.offset_per_depth).sum(-1, keepdim=True)
    terms = torch.cat([e_f, e_o], dim=-1)
    curvature = terms * (lin.unclamped_inverse_depth * const.curvature_scale)
    return curvature, terms @ const.force_map


def _curvature_apply(curvature: Tensor, vectors: Tensor) -> Tensor:
    """M v for the curvature (xz, yz, zz) of :func:`_residual_terms`, v (B, L, 3) in camera coordinates."""
    xz, yz, zz = curvature.unbind(-1)
    v_x, v_y, v_z = vectors.unbind(-1)
    return torch.stack([xz * v_z, yz * v_z, xz * v_x + yz * v_y + zz * v_z], dim=-1)


def chart_hessian(
    lin: Linearisation,
    residual: Tensor,
    weights: Tensor,
    curvature: Tensor | None = None,
    phi: Tensor | None = None,
) -> Tensor:
    """Exact Hessian (B, 6, 6) of ½ Σ w |e|² in the local chart δ = (ω, τ).

    H = Σ_i w_i [J_iᵀ J_i + G_iᵀ M_i G_i] + (rotation block) ½(S + Sᵀ) - tr(S) I,
    with G = dX_cam/dδ, M the projection curvature and S = Σ w φ qᵀ.

    Args:
        lin: the :class:`~pelmark.registration.objective.Linearisation` at θ*.
        residual: (B, L, 2) π(θ*) - l.
        weights: (B, L).
        curvature: (B, L, 3) the curvature of :func:`_residual_terms` if already computed.
        phi: (B, L, 3) its (∂π/∂p')ᵀ e if already computed.
    """
    if curvature is None or phi is None:
        curvature, phi = _residual_terms(lin, residual)
    q = lin.rotated_mm

    # G = dX_cam/dδ = R_AP [-[q]× | I] (B, L, 3, 6): row m is (q × R_AP[m], R_AP[m]), linear in
    # R_AP[m]. Gᵀ M G = a ⊗ G_z + G_z ⊗ a with a = xz G_x + yz G_y + ½ zz G_z, so a is the row of
    # c = xz R_AP[0] + yz R_AP[1] + ½ zz R_AP[2]; a and G_z come from one product (moving_rows).
    a_g_z = moving_rows(
        torch.constant_pad_nd(curvature, (0, 1), 1.0), q, row_maps(residual.dtype, residual.device).curvature
    )
    # All of H but the trace term is one product Σ_i w_i Σ_rows x ⊗ y over rows per landmark:
    # J_u ⊗ J_u + J_v ⊗ J_v (Gauss-Newton), a ⊗ G_z + G_z ⊗ a (projection curvature) and
    # ½(φ ⊗ q + q ⊗ φ) in the rotation block, the symmetric part of S = Σ w φ qᵀ.
    # The rows x are (J_u, J_v, a, G_z, ½(φ, 0), ½(q, 0)) and the rows y the same without the
    # halves and with each pair but J's swapped: one gather and one scaling by exact powers of two.
    phi_q = torch.constant_pad_nd(torch.stack([phi, q], dim=-2), (0, 3))  # rows (φ, 0) and (q, 0)
    rows = torch.cat([lin.jacobian, a_g_z, phi_q], dim=-2)
    const = _constants(residual.dtype, residual.device)
    weighted = (rows * (weights.view(*weights.shape, 1, 1) * const.pair_scale)).flatten(1, 2)
    hessian = torch.bmm(weighted.transpose(-1, -2), rows.index_select(-2, const.partner).flatten(1, 2))
    # The rotation block's - tr(S) I.
    trace = (weights * (phi * q).sum(-1)).sum(-1)
    hessian.diagonal(dim1=-2, dim2=-1).narrow(-1, 0, 3).sub_(trace.unsqueeze(-1))
    return hessian

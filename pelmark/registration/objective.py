"""The registration cost (paper eq. 4), its analytic Jacobian and its gradient.

The cost of a pose θ is the weighted sum of squared reprojection errors

    E(θ) = Σ_i w_i |π(p_i; θ) - l_i|²,

with π :func:`pelmark.geometry.project` (Rodrigues eqs. 5-6, clamped perspective
division eqs. 7-8). Pixels always come from that one projection; the Jacobian
below is derived from the same formulas and tested against autograd through it.

Jacobian. With q = R(r) p (the rotated point before the translation), the
patient motion p' = q + t has dp'/dt = I and dp'/dr = -[q]× J_l(r), where
J_l(r) = I + b K + c K², K = [r]×, b = (1 - cos|r|)/|r|², c = (|r| - sin|r|)/|r|³
is the left Jacobian of SO(3): R(r + δ) ≈ exp([J_l δ]×) R(r). The camera point is
X_cam = R_AP p' + (0, 0, sid), and u = fx X/Z + cx, v = fy Y/Z + cy with Z the
clamped depth, whose derivative is 0 where the clamp is active (as autograd's).

Local chart. For the motion R = exp([ω]×) R(r), t + τ the Jacobian is simply
(-[q]×, I) without J_l; LM steps in δ = (ω, τ) and maps them back to θ with
the retraction r + J_l(r)⁻¹ ω, which has the same first-order model (so the
same convergence) and saves applying J_l to every landmark's Jacobian.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from pelmark.geometry import R_AP, Camera, project_with_depth
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights

# Below this |r|² the SO(3) Jacobian coefficients use their Taylor series: the
# closed forms cancel catastrophically and divide 0 by 0 at r = 0.
_SMALL_ANGLE2 = 1e-6


class _Constants(NamedTuple):
    focal: Tensor  # (fx, fy)
    inverse_focal: Tensor
    centre: Tensor  # (cx, cy)
    source: Tensor  # (0, 0, sid): X_cam = R_AP p' + source
    r_ap: Tensor
    r_ap_xy: Tensor  # (2, 3) the first two rows of R_AP: the camera's x and y axes in the world
    r_ap_z: Tensor  # (3,) its optical axis in the world


@functools.lru_cache(maxsize=32)
def _constants(camera: Camera, dtype: torch.dtype, device: torch.device) -> _Constants:
    """Camera constants as tensors, built once per (camera, dtype, device): the solver's inner
    loop would otherwise spend a good part of its time creating them.

    They are ordinary tensors even when first asked for under inference mode (the LM loop
    runs in it), since autograd code uses them later.
    """
    with torch.inference_mode(False):
        focal = torch.tensor([camera.fx, camera.fy], dtype=dtype, device=device)
        return _Constants(
            focal=focal,
            inverse_focal=1.0 / focal,
            centre=torch.tensor([camera.cx_px, camera.cy_px], dtype=dtype, device=device),
            source=torch.tensor([0.0, 0.0, camera.sid_mm], dtype=dtype, device=device),
            r_ap=R_AP.to(dtype=dtype, device=device),
            r_ap_xy=R_AP[:2].to(dtype=dtype, device=device),
            r_ap_z=R_AP[2].to(dtype=dtype, device=device),
        )


def _left_jacobian_coefficients(rotvec: Tensor) -> tuple[Tensor, Tensor]:
    """b = (1 - cos θ)/θ² and c = (θ - sin θ)/θ³ of J_l, finite with finite gradients at θ = 0."""
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < _SMALL_ANGLE2
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    c = torch.where(small, 1.0 / 6.0 - theta2 / 120.0, (theta - torch.sin(theta)) / (theta2_safe * theta))
    return b, c


def _inverse_coefficient(rotvec: Tensor) -> Tensor:
    """d = (1 - (θ/2) cot(θ/2))/θ² of J_l⁻¹ = I - ½K + dK², finite at θ = 0."""
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < _SMALL_ANGLE2
    theta2_safe = torch.where(small, 1.0, theta2)
    half = theta2_safe.sqrt() / 2.0
    return torch.where(small, 1.0 / 12.0 + theta2 / 720.0, (1.0 - half / torch.tan(half)) / theta2_safe)


def left_jacobian_transpose_apply(rotvec: Tensor, vectors: Tensor) -> Tensor:
    """J_l(r)ᵀ v = v - b r × v + c r × (r × v) for v (B, ..., 3), r (B, 3)."""
    b, c = _left_jacobian_coefficients(rotvec)
    shape = (rotvec.shape[0],) + (1,) * (vectors.ndim - 2)
    r = rotvec.reshape(*shape, 3).expand_as(vectors)
    r_cross = torch.linalg.cross(r, vectors, dim=-1)
    r_cross2 = torch.linalg.cross(r, r_cross, dim=-1)
    return vectors - b.reshape(*shape, 1) * r_cross + c.reshape(*shape, 1) * r_cross2


def left_jacobian_inverse_apply(rotvec: Tensor, vectors: Tensor, transpose: bool = False) -> Tensor:
    """J_l(r)⁻¹ v = v - ½ r × v + d r × (r × v) (or J_l⁻ᵀ v, with +½) for r, v (B, 3)."""
    d = _inverse_coefficient(rotvec)
    r_cross = torch.linalg.cross(rotvec, vectors, dim=-1)
    half = 0.5 if transpose else -0.5
    return vectors + half * r_cross + d[:, None] * torch.linalg.cross(rotvec, r_cross, dim=-1)


def retract(pose: Pose, step: Tensor) -> Pose:
    """θ moved by a chart step δ = (ω, τ): (r + J_l(r)⁻¹ ω, t + τ), exact to first order."""
    return pose + torch.cat([left_jacobian_inverse_apply(pose[:, :3], step[:, :3]), step[:, 3:]], dim=-1)


@dataclasses.dataclass(frozen=True)
class Linearisation:
    """First-order pieces of the projection at a pose, per landmark.

    Attributes:
        pixels: (B, L, 2) from :func:`pelmark.geometry.project_with_depth`.
        depth_mm: (B, L) unclamped depths.
        rotated_mm: (B, L, 3) q = R(r) p, the world point rotated but not translated.
        focal_per_depth: (B, L, 2) (fx/Z, fy/Z) with Z the clamped depth: the diagonal of
            d(u, v)/d(X, Y).
        offset_per_depth: (B, L, 2) ((u - cx)/Z, (v - cy)/Z) where the depth clamp is
            inactive, else 0: minus d(u, v)/dZ.
        pixel_per_world: (B, L, 2, 3) d(u, v)/dp' = d(u, v)/dX_cam R_AP, also d(u, v)/dt.
        pixel_per_omega: (B, L, 2, 3) d(u, v)/dω for the left perturbation R -> exp([ω]×) R,
            rows (q × c_k)ᵀ for the rows c_k of ``pixel_per_world``.
        unclamped_inverse_depth: (B, L) 1/Z where the depth clamp is inactive, else 0
            (the curvature of the perspective division scales with it).
    """

    pixels: Tensor
    depth_mm: Tensor
    rotated_mm: Tensor
    focal_per_depth: Tensor
    offset_per_depth: Tensor
    pixel_per_world: Tensor
    pixel_per_omega: Tensor
    unclamped_inverse_depth: Tensor

    @property
    def pixel_per_camera(self) -> Tensor:
        """(B, L, 2, 3) d(u, v)/dX_cam: rows (fx/Z, 0, -(u - cx)/Z) and (0, fy/Z, -(v - cy)/Z)."""
        return torch.cat([torch.diag_embed(self.focal_per_depth), -self.offset_per_depth[..., None]], dim=-1)


def linearise(points_world_mm: Landmarks3D, pose: Pose, camera: Camera, min_depth_mm: float) -> Linearisation:
    """Project and differentiate once; see the module docstring for the formulas.

    Built from differentiable torch ops only, so autograd through it gives exact
    second derivatives (the tests use this as a reference).
    """
    pixels, depth = project_with_depth(points_world_mm, pose, camera, min_depth_mm)
    const = _constants(camera, pixels.dtype, pixels.device)
    z = depth.clamp_min(min_depth_mm)
    inverse_z = z.reciprocal()

    # Camera coordinates are read back from the pixels (X = (u - cx) Z / fx holds
    # for the clamped Z too), so the projection formula exists only in geometry.
    offset_px = pixels - const.centre
    cam_xy = offset_px * z[..., None] * const.inverse_focal
    cam = torch.cat([cam_xy, depth[..., None]], dim=-1) - const.source
    rotated = cam @ const.r_ap - pose[..., None, 3:]  # q = R(r) p = R_APᵀ (X_cam - sid e_z) - t

    # d(u, v)/dX_cam has rows (fx/Z, 0, -(u - cx)/Z) and (0, fy/Z, -(v - cy)/Z), so its
    # product with R_AP is a sum of two outer products (fewer kernels than building it).
    unclamped_inverse_z = torch.where(depth > min_depth_mm, inverse_z, 0.0)
    along = const.focal * inverse_z[..., None]  # (B, L, 2)
    against_depth = offset_px * unclamped_inverse_z[..., None]
    per_world = along[..., None] * const.r_ap_xy - against_depth[..., None] * const.r_ap_z
    per_omega = torch.linalg.cross(rotated[..., None, :].expand_as(per_world), per_world, dim=-1)
    return Linearisation(
        pixels=pixels,
        depth_mm=depth,
        rotated_mm=rotated,
        focal_per_depth=along,
        offset_per_depth=against_depth,
        pixel_per_world=per_world,
        pixel_per_omega=per_omega,
        unclamped_inverse_depth=unclamped_inverse_z,
    )


def project_with_jacobian(
    points_world_mm: Landmarks3D,
    pose: Pose,
    camera: Camera,
    min_depth_mm: float,
) -> tuple[Landmarks2D, Tensor, Tensor]:
    """Pixels, depths and the pixel Jacobian with respect to θ = (r, t).

    Args:
        points_world_mm: (B, L, 3) world points.
        pose: (B, 6) poses θ.
        camera: the detector and nominal C-arm.
        min_depth_mm: depth clamp of the perspective division.

    Returns:
        pixels (B, L, 2) from :func:`pelmark.geometry.project_with_depth`, the
        unclamped depths (B, L) in mm, and the Jacobian (B, L, 2, 6): rows
        (J_lᵀ (q × c_k), c_k), since dp'/dr = -[q]× J_l(r).
    """
    lin = linearise(points_world_mm, pose, camera, min_depth_mm)
    per_rotvec = left_jacobian_transpose_apply(pose[..., :3], lin.pixel_per_omega)
    return lin.pixels, lin.depth_mm, torch.cat([per_rotvec, lin.pixel_per_world], dim=-1)


def chart_jacobian(lin: Linearisation) -> Tensor:
    """(B, L, 2, 6) pixel Jacobian with respect to the chart δ = (ω, τ)."""
    return torch.cat([lin.pixel_per_omega, lin.pixel_per_world], dim=-1)


def weighted_cost(residual_px: Tensor, weights: Weights) -> Tensor:
    """Paper eq. 4 per sample: Σ_i w_i |e_i|², shape (B,)."""
    return (weights * residual_px.square().sum(-1)).sum(-1)


def rms_residual_px(residual_px: Tensor, weights: Weights) -> Tensor:
    """Weighted RMS reprojection error per sample, sqrt(Σ w |e|² / Σ w); 0 where Σ w = 0."""
    total = weights.sum(-1)
    mean_square = weighted_cost(residual_px, weights) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, mean_square, torch.zeros_like(mean_square)).sqrt()


def normal_equations(jacobian: Tensor, residual_px: Tensor, weights: Weights) -> tuple[Tensor, Tensor]:
    """Gauss-Newton matrix JᵀWJ (B, 6, 6) and half-gradient JᵀWe (B, 6) of the cost."""
    weighted = (jacobian * weights[..., None, None]).flatten(1, 2).transpose(-1, -2)  # (B, 6, 2L)
    # Batched matmul: much faster than einsum for these small shapes.
    hessian = weighted @ jacobian.flatten(1, 2)
    gradient = (weighted @ residual_px.flatten(1, 2)[..., None])[..., 0]
    return hessian, gradient


def gauss_newton_system(lin: Linearisation, residual_px: Tensor, weights: Weights) -> tuple[Tensor, Tensor, Tensor]:
    """JᵀWJ (B, 6, 6), JᵀWe (B, 6) and the cost eᵀWe (B,) in the chart, from one batched product.

    [J | e]ᵀ W [J | e] holds all three: its top-left block, last column and last entry.
    """
    augmented = torch.cat([lin.pixel_per_omega, lin.pixel_per_world, residual_px[..., None]], dim=-1)  # (B, L, 2, 7)
    weighted = (augmented * weights[..., None, None]).flatten(1, 2)
    product = weighted.transpose(-1, -2) @ augmented.flatten(1, 2)
    return product[:, :6, :6], product[:, :6, 6], product[:, 6, 6]


def cost_gradient(
    pose: Pose,
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
    min_depth_mm: float,
) -> Tensor:
    """F(θ, x) = ½ ∇_θ E = Jᵀ W (π(θ) - l), (B, 6): zero at a solution.

    Differentiable in all its tensor arguments, so autograd gives ∂F/∂θ (the
    exact Hessian in θ) and ∂F/∂x: the tests use it as an independent reference
    for the analytic implicit backward.
    """
    pixels, _, jacobian = project_with_jacobian(points_world_mm, pose, camera, min_depth_mm)
    _, gradient = normal_equations(jacobian, pixels - landmarks_px, weights)
    return gradient


def wrap_rotation(pose: Pose) -> Pose:
    """The same rigid motions with |r| ≤ π: r ↦ r (|r| - 2π k)/|r| leaves R(r) unchanged."""
    rotvec = pose[..., :3]
    angle = rotvec.norm(dim=-1, keepdim=True)
    wrapped = torch.remainder(angle + math.pi, 2.0 * math.pi) - math.pi
    scale = torch.where(angle > math.pi, wrapped / angle.clamp_min(math.pi), torch.ones_like(angle))
    return torch.cat([rotvec * scale, pose[..., 3:]], dim=-1)

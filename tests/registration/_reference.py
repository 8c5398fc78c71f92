"""A differentiable torch twin of the host solver's arithmetic: the reference the tests check it against.

The package computes the registration's Jacobian, normal equations and Hessian
in NumPy (:mod:`pelmark.registration.host`). These torch functions give the
same quantities from the same formulas, differentiable, so that autograd can
check them (the θ Jacobian, the implicit-function theorem's second derivatives)
and the host's results can be compared with them.

Jacobian. With q = R(r) p, p' = q + t has dp'/dt = I and dp'/dr = -[q]× J_l(r),
J_l(r) = I + b K + c K², K = [r]×, b = (1 - cos|r|)/|r|², c = (|r| - sin|r|)/|r|³.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from pelmark.geometry import Camera, project_with_rotated
from pelmark.registration import host
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights

# Below this |r|² the SO(3) Jacobian coefficients use their Taylor series: the
# closed forms cancel catastrophically and divide 0 by 0 at r = 0.
_SMALL_ANGLE2 = 1e-6


class _Constants(NamedTuple):
    focal: Tensor  # (fx, fy)
    centre: Tensor  # (cx, cy)
    zero: Tensor  # 0: where() takes a tensor faster than a float


@functools.lru_cache(maxsize=32)
def _constants(camera: Camera, dtype: torch.dtype, device: torch.device) -> _Constants:
    """Camera constants as tensors, built once per (camera, dtype, device)."""
    return _Constants(
        focal=torch.tensor([camera.fx, camera.fy], dtype=dtype, device=device),
        centre=torch.tensor([camera.cx_px, camera.cy_px], dtype=dtype, device=device),
        zero=torch.zeros((), dtype=dtype, device=device),
    )


class RowMaps(NamedTuple):
    """The maps of :func:`moving_rows`: the host solver's (:mod:`pelmark.registration.host`), as tensors."""

    jacobian: Tensor  # (16, 12): s = (fx/Z, fy/Z, (u - cx)/Z, (v - cy)/Z) to the rows of J_δ
    curvature: Tensor  # (16, 12): s = (xz, yz, zz, 1) to the rows a and G_z of the implicit Hessian


def row_maps(dtype: torch.dtype, device: torch.device) -> RowMaps:
    maps = host.row_maps()
    return RowMaps(*(torch.from_numpy(m).to(dtype=dtype, device=device) for m in (maps.jacobian, maps.curvature)))


def moving_rows(scales: Tensor, rotated_mm: Tensor, row_map: Tensor) -> Tensor:
    """(B, L, 2, 6) rows (q × c_k, c_k) from per-landmark coefficients s (B, L, 4), q (B, L, 3)
    and a map of :func:`row_maps`: one product with a constant instead of cross products."""
    outer = torch.cat([(scales.unsqueeze(-1) * rotated_mm.unsqueeze(-2)).flatten(-2), scales], dim=-1)
    return (outer @ row_map).view(*scales.shape[:-1], 2, 6)


def _left_jacobian_coefficients(rotvec: Tensor) -> tuple[Tensor, Tensor]:
    """b = (1 - cos θ)/θ² and c = (θ - sin θ)/θ³ of J_l, finite with finite gradients at θ = 0."""
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < _SMALL_ANGLE2
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    c = torch.where(small, 1.0 / 6.0 - theta2 / 120.0, (theta - torch.sin(theta)) / (theta2_safe * theta))
    return b, c


def left_jacobian_transpose_apply(rotvec: Tensor, vectors: Tensor) -> Tensor:
    """J_l(r)ᵀ v = v - b r × v + c r × (r × v) for v (B, ..., 3), r (B, 3)."""
    b, c = _left_jacobian_coefficients(rotvec)
    shape = (rotvec.shape[0],) + (1,) * (vectors.ndim - 2)
    r = rotvec.reshape(*shape, 3).expand_as(vectors)
    r_cross = torch.linalg.cross(r, vectors, dim=-1)
    r_cross2 = torch.linalg.cross(r, r_cross, dim=-1)
    return vectors - b.reshape(*shape, 1) * r_cross + c.reshape(*shape, 1) * r_cross2


@dataclasses.dataclass(frozen=True)
class Linearisation:
    """First-order pieces of the projection at a pose, per landmark.

    Attributes:
        pixels: (B, L, 2) from :func:`pelmark.geometry.project_with_rotated` (the
            pixels of :func:`pelmark.geometry.project`, bit for bit).
        depth_mm: (B, L) unclamped depths.
        rotated_mm: (B, L, 3) q = R(r) p, the world point rotated but not translated.
        focal_per_depth: (B, L, 2) (fx/Z, fy/Z) with Z the clamped depth: the diagonal of
            d(u, v)/d(X, Y).
        offset_per_depth: (B, L, 2) ((u - cx)/Z, (v - cy)/Z) where the depth clamp is
            inactive, else 0: minus d(u, v)/dZ.
        jacobian: (B, L, 2, 6) d(u, v)/dδ in the chart δ = (ω, τ): ``pixel_per_omega``
            then ``pixel_per_world``.
        unclamped_inverse_depth: (B, L, 1) 1/Z where the depth clamp is inactive, else 0
            (the curvature of the perspective division scales with it), a column to scale
            per-landmark rows.
    """

    pixels: Tensor
    depth_mm: Tensor
    rotated_mm: Tensor
    focal_per_depth: Tensor
    offset_per_depth: Tensor
    jacobian: Tensor
    unclamped_inverse_depth: Tensor

    @property
    def pixel_per_world(self) -> Tensor:
        """(B, L, 2, 3) d(u, v)/dp' = d(u, v)/dX_cam R_AP, also d(u, v)/dt."""
        return self.jacobian[..., 3:]

    @property
    def pixel_per_omega(self) -> Tensor:
        """(B, L, 2, 3) d(u, v)/dω for the left perturbation R -> exp([ω]×) R: rows
        (q × c_k)ᵀ for the rows c_k of ``pixel_per_world``."""
        return self.jacobian[..., :3]

    @property
    def pixel_per_camera(self) -> Tensor:
        """(B, L, 2, 3) d(u, v)/dX_cam: rows (fx/Z, 0, -(u - cx)/Z) and (0, fy/Z, -(v - cy)/Z)."""
        return torch.cat([torch.diag_embed(self.focal_per_depth), -self.offset_per_depth[..., None]], dim=-1)


def linearise(points_world_mm: Landmarks3D, pose: Pose, camera: Camera, min_depth_mm: float) -> Linearisation:
    """Project and differentiate once; see the module docstring for the formulas.

    Built from differentiable torch ops only, so autograd through it gives exact
    second derivatives. The chart Jacobian is one product with a constant (:func:`moving_rows`).
    """
    pixels, depth, rotated = project_with_rotated(points_world_mm, pose, camera, min_depth_mm)
    const = _constants(camera, pixels.dtype, pixels.device)
    depth_1 = depth.unsqueeze(-1)
    inverse_z = depth_1.clamp_min(min_depth_mm).reciprocal()
    unclamped_inverse_z = torch.where(depth_1 > min_depth_mm, inverse_z, const.zero)
    along = const.focal * inverse_z  # (B, L, 2)
    against_depth = (pixels - const.centre) * unclamped_inverse_z
    scales = torch.cat([along, against_depth], dim=-1)
    jacobian = moving_rows(scales, rotated, row_maps(pixels.dtype, pixels.device).jacobian)
    return Linearisation(
        pixels=pixels,
        depth_mm=depth,
        rotated_mm=rotated,
        focal_per_depth=along,
        offset_per_depth=against_depth,
        jacobian=jacobian,
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
    return lin.jacobian


def normal_equations(jacobian: Tensor, residual_px: Tensor, weights: Weights) -> tuple[Tensor, Tensor]:
    """Gauss-Newton matrix JᵀWJ (B, 6, 6) and half-gradient JᵀWe (B, 6) of the cost."""
    weighted = (jacobian * weights[..., None, None]).flatten(1, 2).transpose(-1, -2)  # (B, 6, 2L)
    # Batched matmul: much faster than einsum for these small shapes.
    hessian = weighted @ jacobian.flatten(1, 2)
    gradient = (weighted @ residual_px.flatten(1, 2)[..., None])[..., 0]
    return hessian, gradient


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

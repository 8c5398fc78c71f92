"""Starting poses: the identity (the paper's), a closed form, or one the caller gives.

The closed form is a weighted direct linear transform (DLT) on the calibrated
rays K⁻¹(u, v, 1): it solves λ m_i = P (p_i, 1) for the 3x4 camera matrix P in
the least-squares sense, makes its left 3x3 block a rotation, and converts the
world-to-camera matrix [R | t] to θ as :func:`pelmark.geometry.camera_to_pose`
does (θ-matrix = nominal_extrinsic⁻¹ [R | t]).
It needs six visible, non-coplanar landmarks; otherwise, or when its pose fits
worse than the identity, the identity is used.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, nominal_extrinsic, project, rotation_to_rotvec
from pelmark.registration.objective import weighted_cost
from pelmark.registration.options import Init
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights

DLT_MIN_POINTS = 6
# The DLT's first two rows are s r1, s r2 up to noise; their Gram matrix over s²
# further than this from the identity is not a camera.
_MAX_DISTORTION = 0.5


@functools.lru_cache(maxsize=32)
def _inverse_nominal_extrinsic(camera: Camera, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rotation and translation of nominal_extrinsic⁻¹, computed once per camera."""
    inverse = torch.linalg.inv(nominal_extrinsic(camera, dtype)).to(device)
    return inverse[:3, :3], inverse[:3, 3]


def closed_form_pose(
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
) -> tuple[Pose, Tensor]:
    """Poses θ from a weighted DLT on calibrated rays, batched.

    With the 3D points centred on their centroid, the last entry of P is the
    centroid's depth (times a scale), positive for any view of the anatomy, so
    fixing it to 1 turns the DLT into an 11-unknown linear least-squares
    problem (a Cholesky solve instead of an eigen-decomposition) with the sign
    of P already right. The 3x3 block, a scaled rotation up to noise, is made a
    rotation by Gram-Schmidt on its two well-determined rows (the image axes),
    and the translation is then solved again with that rotation fixed: this is
    a start for LM, not an answer.

    Args:
        landmarks_px: (B, L, 2) float64 detections.
        weights: (B, L) float64 weights; 0 excludes a landmark.
        points_world_mm: (B, L, 3) float64 world points.
        camera: the detector (its intrinsics calibrate the rays).

    Returns:
        (B, 6) poses (identity where unusable) and (B,) True where the closed
        form is usable: at least six visible points, a solvable system, a 3x3
        block close to a scaled rotation, and every visible point in front of
        the source.
    """
    dtype, device = landmarks_px.dtype, landmarks_px.device
    batch = landmarks_px.shape[0]
    visible = weights > 0
    count = visible.sum(-1)
    total = weights.sum(-1, keepdim=True).clamp_min(1e-300)
    centroid = (points_world_mm * weights[..., None]).sum(-2) / total
    centred = points_world_mm - centroid[:, None]
    # Unit-scale coordinates keep the normal equations well conditioned (Hartley).
    scale = (weights * centred.square().sum(-1)).sum(-1, keepdim=True).div(total).clamp_min(1e-18).rsqrt()
    normalised = centred * scale[..., None]
    homogeneous = torch.cat([normalised, torch.ones_like(normalised[..., :1])], dim=-1)

    ray_x = ((landmarks_px[..., 0] - camera.cx_px) / camera.fx)[..., None]
    ray_y = ((landmarks_px[..., 1] - camera.cy_px) / camera.fy)[..., None]
    zeros = torch.zeros_like(homogeneous)
    row_x = torch.cat([homogeneous, zeros, -ray_x * normalised], dim=-1)
    row_y = torch.cat([zeros, homogeneous, -ray_y * normalised], dim=-1)
    design = torch.cat([row_x, row_y], dim=-2)  # (B, 2L, 11)
    target = torch.cat([ray_x, ray_y], dim=-2)  # (B, 2L, 1)
    weighted = (design * torch.cat([weights, weights], dim=-1)[..., None]).transpose(-1, -2)
    factor, info = torch.linalg.cholesky_ex(weighted @ design)
    solution = torch.cholesky_solve(weighted @ target, factor)[..., 0]
    projection = torch.cat([solution, torch.ones_like(solution[:, :1])], dim=-1).reshape(batch, 3, 4)

    # Undo the normalisation: P_world = P_norm [[s I, -s c], [0, 1]].
    block = projection[..., :3] * scale[..., None]
    offset = projection[..., 3] - (block @ centroid[..., None])[..., 0]
    row_norm = block.norm(dim=-1)
    first = block[:, 0] / row_norm[:, :1]
    second = block[:, 1] - (block[:, 1] * first).sum(-1, keepdim=True) * first
    second = second / second.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    third = torch.linalg.cross(first, second, dim=-1)
    rotation = torch.stack([first, second, third], dim=-2)
    size = row_norm[:, :2].mean(-1, keepdim=True)
    rotated = points_world_mm @ rotation.transpose(-1, -2)
    translation = _translation_given_rotation(rotated, ray_x[..., 0], ray_y[..., 0], weights)
    translation = torch.where(torch.isfinite(translation), translation, offset / size)

    # geometry.camera_to_pose without building (B, 4, 4) matrices: θ = nominal⁻¹ [R | t].
    inverse_rotation, inverse_translation = _inverse_nominal_extrinsic(camera, dtype, device)
    pose = torch.cat(
        [rotation_to_rotvec(inverse_rotation @ rotation), translation @ inverse_rotation.T + inverse_translation],
        dim=-1,
    )

    depth = rotated[..., 2] + translation[:, None, 2]
    in_front = ((depth > 0) | ~visible).all(-1)
    # A camera's block is s R. Its first two rows (the image axes) are well
    # determined and must be near-orthogonal with equal norms; the third (depth)
    # is weakly determined under the C-arm's mild perspective and only has to
    # agree in sign with their cross product.
    gram = block[:, :2] @ block[:, :2].transpose(-1, -2) / size[..., None].square()
    distortion = (gram - torch.eye(2, dtype=dtype, device=device)).abs().amax((-2, -1))
    rigid = (distortion < _MAX_DISTORTION) & ((block[:, 2] * third).sum(-1) > 0)
    ok = (count >= DLT_MIN_POINTS) & (info == 0) & rigid & in_front & torch.isfinite(pose).all(-1)
    pose = torch.where(ok[:, None], pose, torch.zeros_like(pose))
    return pose, ok


def _translation_given_rotation(rotated: Tensor, ray_x: Tensor, ray_y: Tensor, weights: Tensor) -> Tensor:
    """Least-squares t of x_i (r3·p_i + t_z) = r1·p_i + t_x (and y) for a fixed rotation.

    The DLT's translation absorbs the error of its scale, mostly along the
    optical axis; with the rotation fixed the equations are linear in t, and
    solving them again removes most of that error.

    Args:
        rotated: (B, L, 3) R p_i, the points rotated into the camera axes.
        ray_x, ray_y: (B, L) calibrated ray coordinates of the detections.
        weights: (B, L).
    """
    one, zero = torch.ones_like(ray_x), torch.zeros_like(ray_x)
    row_x = torch.stack([one, zero, -ray_x], dim=-1)
    row_y = torch.stack([zero, one, -ray_y], dim=-1)
    design = torch.cat([row_x, row_y], dim=-2)  # (B, 2L, 3)
    target = torch.cat([ray_x * rotated[..., 2] - rotated[..., 0], ray_y * rotated[..., 2] - rotated[..., 1]], dim=-1)
    weighted = (design * torch.cat([weights, weights], dim=-1)[..., None]).transpose(-1, -2)
    translation, _ = torch.linalg.solve_ex(weighted @ design, (weighted @ target[..., None])[..., 0])
    return translation


def starting_poses(
    init: Init | str | Tensor,
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
) -> Tensor:
    """Candidate starts (K, B, 6) float64 for an ``init`` argument (no gradient).

    ``IDENTITY`` and a pose tensor give one candidate; ``CLOSED_FORM`` gives two,
    the DLT pose (identity where unusable) and the identity, so that the closed
    form never makes a start worse than the paper's (see :func:`initial_pose`).

    Raises:
        PelmarkError: for a pose tensor of the wrong shape or an unknown name.
    """
    batch = landmarks_px.shape[0]
    dtype, device = torch.float64, landmarks_px.device
    if isinstance(init, Tensor):
        if tuple(init.shape) != (batch, 6):
            raise PelmarkError(f"init pose must have shape ({batch}, 6), got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise PelmarkError("init pose must be finite")
        return init.detach().to(dtype=dtype, device=device)[None]
    try:
        kind = Init(init)
    except ValueError as error:
        raise PelmarkError(f"unknown init {init!r}; use one of {[i.value for i in Init]} or a (B, 6) pose") from error
    identity = torch.zeros(1, batch, 6, dtype=dtype, device=device)
    if kind is Init.IDENTITY:
        return identity
    with torch.no_grad():
        closed, _ = closed_form_pose(landmarks_px, weights, points_world_mm, camera)
    return torch.cat([closed[None], identity])


def initial_pose(
    init: Init | str | Tensor,
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
    min_depth_mm: float,
) -> Pose:
    """Resolve an ``init`` argument to (B, 6) float64 starting poses (no gradient).

    Of the candidates of :func:`starting_poses` each sample takes the one that
    fits its detections best (the first on ties).
    """
    starts = starting_poses(init, landmarks_px, weights, points_world_mm, camera)
    count, batch = starts.shape[:2]
    if count == 1:
        return starts[0]
    with torch.no_grad():
        repeat = (count, 1, 1)
        pixels = project(points_world_mm.repeat(repeat), starts.reshape(-1, 6), camera, min_depth_mm)
        cost = weighted_cost(pixels - landmarks_px.repeat(repeat), weights.repeat(count, 1)).reshape(count, batch)
        cost = torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))
        best = cost.argmin(0)
    return starts[best, torch.arange(batch, device=starts.device)]

"""Starting poses: the identity (the paper's), a closed form, or one the caller gives.

The closed form is a weighted direct linear transform (DLT) on the calibrated
rays K⁻¹(u, v, 1): it solves λ m_i = P (p_i, 1) for the 3x4 camera matrix P in
the least-squares sense, makes its left 3x3 block a rotation, and converts the
world-to-camera matrix [R | t] to θ as :func:`pelmark.geometry.camera_to_pose`
does (θ-matrix = nominal_extrinsic⁻¹ [R | t]).
It needs six visible, non-coplanar landmarks; otherwise, or when its pose fits
worse than the identity, the identity is used. Like the solver it starts, it
runs in NumPy on the host (see :mod:`pelmark.registration.host`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, nominal_extrinsic, project, rotation_to_rotvec_host
from pelmark.registration import host
from pelmark.registration.host import cross, solve_definite
from pelmark.registration.objective import weighted_cost
from pelmark.registration.options import Init
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights

DLT_MIN_POINTS = 6
# The DLT's first two rows are s r1, s r2 up to noise; their Gram matrix over s²
# further than this from the identity is not a camera.
_MAX_DISTORTION = 0.5


class _Constants(NamedTuple):
    inverse_rotation: np.ndarray  # of nominal_extrinsic⁻¹
    inverse_rotation_t: np.ndarray  # its transpose
    inverse_translation: np.ndarray
    centre: np.ndarray  # (cx, cy)
    focal: np.ndarray  # (fx, fy)
    dlt_rows: np.ndarray  # (12, 24): see _dlt_rows
    translation_rows: np.ndarray  # (12, 8): see _translation_rows


@functools.lru_cache(maxsize=32)
def _constants(camera: Camera) -> _Constants:
    """What the closed form needs of a camera, in float64, built once per camera."""
    inverse = torch.linalg.inv(nominal_extrinsic(camera, torch.float64)).numpy()
    return _Constants(
        inverse_rotation=inverse[:3, :3].copy(),
        inverse_rotation_t=inverse[:3, :3].T.copy(),
        inverse_translation=inverse[:3, 3].copy(),
        centre=np.array([camera.cx_px, camera.cy_px]),
        focal=np.array([camera.fx, camera.fy]),
        dlt_rows=_dlt_rows(),
        translation_rows=_translation_rows(),
    )


def _dlt_rows() -> np.ndarray:
    """(12, 24) M with [A | b] = ((1, x, y) ⊗ (n, 1)) M, the DLT's two rows per landmark.

    With h = (n, 1) the normalised homogeneous point and (x, y) its ray, the rows
    are (h, 0, -x n | x) and (0, h, -y n | y): every entry is bilinear in
    (1, x, y) and h, so one product with this constant builds them.
    """
    rows = np.zeros((3, 4, 2, 12))
    for k in range(2):
        rows[0, :, k, 4 * k : 4 * k + 4] = np.eye(4)  # h
        rows[1 + k, :3, k, 8:11] = -np.eye(3)  # -x n (-y n)
        rows[1 + k, 3, k, 11] = 1.0  # x (y)
    return rows.reshape(12, 24)


def _translation_rows() -> np.ndarray:
    """(12, 8) M with [A | b] = ((1, x, y) ⊗ (1, q)) M for t given the rotation (q = R p).

    The rows are (1, 0, -x | x q_z - q_x) and (0, 1, -y | y q_z - q_y).
    """
    rows = np.zeros((3, 4, 2, 4))
    for k in range(2):
        rows[0, 0, k, k] = 1.0
        rows[1 + k, 0, k, 2] = -1.0
        rows[1 + k, 3, k, 3] = 1.0
        rows[0, 1 + k, k, 3] = -1.0
    return rows.reshape(12, 8)


def _normal_matrix(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[A | b]ᵀ W [A | b] (B, n, n) of rows (B, L, 2, n) that share their landmark's weight."""
    batch, _, _, n = rows.shape
    flat = rows.reshape(batch, -1, n)
    weighted = (rows * weights[..., None, None]).reshape(batch, -1, n)
    return weighted.transpose(0, 2, 1) @ flat


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
        (B, 6) float64 poses (identity where unusable) and (B,) True where the
        closed form is usable: at least six visible points, a solvable system, a
        3x3 block close to a scaled rotation, and every visible point in front of
        the source; both on the inputs' device, without gradient.
    """
    device = landmarks_px.device
    arrays = [x.detach().to("cpu", torch.float64).numpy() for x in (landmarks_px, weights, points_world_mm)]
    # A sample without a usable system gives NaN on the way (0/0), which ok masks, as in torch.
    with np.errstate(all="ignore"):
        pose, ok = closed_form_host(*arrays, camera)
    return torch.from_numpy(pose).to(device), torch.from_numpy(ok).to(device)


def closed_form_host(
    landmarks_px: np.ndarray, weights: np.ndarray, points_world_mm: np.ndarray, camera: Camera
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`closed_form_pose` on float64 arrays: (B, 6) poses and (B,) usable."""
    const = _constants(camera)
    visible = weights > 0
    solvable = visible.sum(-1) >= DLT_MIN_POINTS
    total = np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    centroid = (points_world_mm * weights[..., None]).sum(-2) / total
    centred = points_world_mm - centroid[:, None]
    # Unit-scale coordinates keep the normal equations well conditioned (Hartley).
    scale = 1.0 / np.sqrt(np.maximum((weights * (centred * centred).sum(-1)).sum(-1, keepdims=True) / total, 1e-18))
    normalised = centred * scale[..., None]
    ones = np.ones(weights.shape + (1,))
    homogeneous = np.concatenate([normalised, ones], axis=-1)
    # (1, x, y) with (x, y) the calibrated ray: both systems' rows are bilinear in it.
    rays = np.concatenate([ones, (landmarks_px - const.centre) / const.focal], axis=-1)

    # All the DLT's normal equations come from one product (see _dlt_rows).
    normal = _normal_matrix(_bilinear(rays, homogeneous, const.dlt_rows), weights)
    solution, factored = solve_definite(normal[:, :11, :11], normal[:, :11, 11])
    solved = solvable & factored
    projection = np.concatenate([solution, np.ones((len(solution), 1))], axis=-1).reshape(-1, 3, 4)

    # Undo the normalisation: P_world = P_norm [[s I, -s c], [0, 1]].
    block = projection[..., :3] * scale[..., None]
    offset = projection[..., 3] - (block @ centroid[..., None])[..., 0]
    row_norm = np.sqrt((block * block).sum(-1))
    first = block[:, 0] / row_norm[:, :1]
    second = block[:, 1] - (block[:, 1] * first).sum(-1, keepdims=True) * first
    second = second / np.maximum(np.sqrt((second * second).sum(-1, keepdims=True)), 1e-300)
    third = cross(first, second)
    rotation = np.stack([first, second, third], axis=-2)
    size = row_norm[:, :2].mean(-1, keepdims=True)
    rotated = points_world_mm @ rotation.transpose(0, 2, 1)
    translation = _translation_given_rotation(rotated, rays, weights, const.translation_rows)
    translation = np.where(np.isfinite(translation), translation, offset / size)

    # geometry.camera_to_pose without building (B, 4, 4) matrices: θ = nominal⁻¹ [R | t].
    rotvec = rotation_to_rotvec_host(const.inverse_rotation @ rotation)
    pose = np.concatenate([rotvec, translation @ const.inverse_rotation_t + const.inverse_translation], axis=-1)

    depth = rotated[..., 2] + translation[:, None, 2]
    in_front = ((depth > 0) | ~visible).all(-1)
    # A camera's block is s R. Its first two rows (the image axes) are well
    # determined and must be near-orthogonal with equal norms; the third (depth)
    # is weakly determined under the C-arm's mild perspective and only has to
    # agree in sign with their cross product.
    image_axes = block[:, :2]
    gram = image_axes @ image_axes.transpose(0, 2, 1) / (size * size)[..., None]
    distortion = np.abs(gram - np.eye(2)).max((-2, -1))
    rigid = (distortion < _MAX_DISTORTION) & ((block[:, 2] * third).sum(-1) > 0)
    ok = solved & rigid & in_front & np.isfinite(pose).all(-1)
    return np.where(ok[:, None], pose, 0.0), ok


def _bilinear(left: np.ndarray, right: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(B, L, 2, n): the rows (left ⊗ right) M of a system whose entries are bilinear in left and right."""
    batch, count = left.shape[:2]
    outer = (left[..., :, None] * right[..., None, :]).reshape(batch, count, -1)
    return (outer @ rows).reshape(batch, count, 2, -1)


def _translation_given_rotation(
    rotated: np.ndarray, rays: np.ndarray, weights: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Least-squares t of x_i (r3·p_i + t_z) = r1·p_i + t_x (and y) for a fixed rotation.

    The DLT's translation absorbs the error of its scale, mostly along the
    optical axis; with the rotation fixed the equations are linear in t, and
    solving them again removes most of that error.

    Args:
        rotated: (B, L, 3) R p_i, the points rotated into the camera axes.
        rays: (B, L, 3) (1, x, y) with (x, y) the calibrated ray of each detection.
        weights: (B, L).
        rows: :func:`_translation_rows`.

    Returns:
        (B, 3) t, NaN where the system is singular.
    """
    ones = np.ones(rotated.shape[:-1] + (1,))
    normal = _normal_matrix(_bilinear(rays, np.concatenate([ones, rotated], axis=-1), rows), weights)
    translation, solved = solve_definite(normal[:, :3, :3], normal[:, :3, 3])
    return np.where(solved[:, None], translation, np.nan)


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
    arrays = (host.to_host(x) for x in (landmarks_px, weights, points_world_mm))
    return torch.from_numpy(starting_poses_host(init, *arrays, camera)).to(landmarks_px.device)


def starting_poses_host(
    init: Init | str | Tensor,
    landmarks_px: np.ndarray,
    weights: np.ndarray,
    points_world_mm: np.ndarray,
    camera: Camera,
) -> np.ndarray:
    """:func:`starting_poses` on host arrays (float64), as a float64 array."""
    batch = landmarks_px.shape[0]
    if isinstance(init, Tensor):
        if tuple(init.shape) != (batch, 6):
            raise PelmarkError(f"init pose must have shape ({batch}, 6), got {tuple(init.shape)}")
        start = host.to_host(init)
        if not np.isfinite(start).all():
            raise PelmarkError("init pose must be finite")
        return start[None]
    try:
        kind = Init(init)
    except ValueError as error:
        raise PelmarkError(f"unknown init {init!r}; use one of {[i.value for i in Init]} or a (B, 6) pose") from error
    identity = np.zeros((1, batch, 6))
    if kind is Init.IDENTITY:
        return identity
    # A sample without a usable system gives NaN on the way (0/0), which ok masks, as in torch.
    with np.errstate(all="ignore"):
        closed, _ = closed_form_host(landmarks_px, weights, points_world_mm, camera)
    return np.concatenate([closed[None], identity])


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

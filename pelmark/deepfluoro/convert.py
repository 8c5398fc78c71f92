"""DeepFluoro's camera, pose and landmark conventions, converted exactly into pelmark's.

DeepFluoro, as its layout document states it
--------------------------------------------
* ``p_lps``: a 3D landmark (``vol-landmarks``) in the specimen CT's LPS mm.
* ``T``: ``gt-poses/cam-to-pelvis-vol``, camera world frame -> pelvis volume (LPS).
* ``E``: ``proj-params/extrinsic``, camera world frame -> camera projective frame.
* ``K``: ``proj-params/intrinsic``, camera projective frame -> image plane.
* So a landmark's pixel (column, row) is ``q = K (E T⁻¹ p_lps)[:3]``, ``(q0/q2, q1/q2)``.
* The projective frame has its origin at the X-ray source, X along increasing
  columns, Y along increasing rows, and Z normal to the image pointing towards
  the source: imaged points have Z < 0, and their depth is ``-Z``.
* Pixel (column, row) coordinates are continuous ITK indices: the centre of
  pixel (r, c) is (c, r), as in pelmark (xreg, which made the dataset, is ITK-based).

pelmark (:mod:`pelmark.geometry`)
---------------------------------
World = RAS mm with the origin at the CT centre ``c``; camera frame with +x
along columns, +y along rows, +z from the source to the detector (depth > 0),
right-handed; ``u = fx x / z + cx`` with ``fx > 0``.

The conversion
--------------
1. World: ``p_lps = F (p_world + c)`` with ``F = diag(-1, -1, 1)``; as a 4x4
   matrix ``A = [[F, F c], [0, 1]]``.
2. Camera axes: ``p_pelmark = S p_deepfluoro`` with ``S = diag(sx, sy, -1)``, so
   depth is ``-Z``. ``u = K00 X / Z + K02 = (-K00) X / (-Z) + K02``, hence
   ``fx = |K00|`` and ``sx = -sign(K00)``; likewise ``fy = |K11|``, ``sy = -sign(K11)``.
3. Handedness: ``S`` must be a rotation (det +1). With the documented frame
   (right-handed, Z towards the source) ``K00, K11 < 0`` and ``S = diag(1, 1, -1)``
   is a reflection: a DeepFluoro image is the mirror image of what pelmark's
   camera sees (it shows the detector as seen from behind, pelmark as seen from
   the source). The image's columns are then reversed, ``u' = W - 1 - u``,
   ``cx' = W - 1 - cx`` and ``sx' = -sx``, which makes det S = +1.
4. rot-180-for-up: the image turns 180° about the principal point,
   ``(u, v) -> (2 cx - u, 2 cy - v)``, which is the camera turning about its
   optical axis, ``R_up = diag(-1, -1, 1)``.

So ``world_to_camera = [R_up S, 0; 0, 1] E T⁻¹ A`` and
``θ = geometry.camera_to_pose(world_to_camera, camera)``; the pelmark camera has
``sdd = |K00| * pixel-col-spacing``, spacing ``(pixel-col-spacing, sdd / |K11|)``
and the principal point ``(cx', K12)``. :func:`convert_projection` proves it on
every projection by projecting the 3D landmarks with :func:`pelmark.geometry.project`
and comparing with the file's converted ``gt-landmarks``.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import numpy as np
import torch

from pelmark.deepfluoro.layout import ProjectionParams, ProjectionRecord, SpecimenIndex
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, camera_to_pose, project_with_depth
from pelmark.io.ct import LPS_RAS_FLIP
from pelmark.landmark_sets import DEEPFLUORO_LANDMARKS, PAPER_LANDMARKS

LPS_FLIP = np.diag(LPS_RAS_FLIP)  # F: RAS <-> LPS, its own inverse
R_UP = np.diag([-1.0, -1.0, 1.0])


class LandmarkSet(str, enum.Enum):
    """Which landmark list an import writes: the paper's eight or DeepFluoro's fourteen."""

    PAPER = "paper"
    DEEPFLUORO14 = "deepfluoro14"

    @property
    def names(self) -> tuple[str, ...]:
        return PAPER_LANDMARKS if self is LandmarkSet.PAPER else DEEPFLUORO_LANDMARKS


# pelmark landmarks that are not a DeepFluoro name: the paper's midline SPS and IPS are
# the midpoints of DeepFluoro's left and right points (see pelmark.landmark_sets).
DERIVED_LANDMARKS: dict[str, tuple[str, ...]] = {"SPS": ("SPS-l", "SPS-r"), "IPS": ("IPS-l", "IPS-r")}


def landmark_sources(name: str) -> tuple[str, ...]:
    """The DeepFluoro landmarks whose mean is pelmark's landmark ``name``."""
    return DERIVED_LANDMARKS.get(name, (name,))


def required_sources(names: tuple[str, ...]) -> tuple[str, ...]:
    """Every DeepFluoro landmark the list ``names`` is made of, without repeats, in order."""
    return tuple(dict.fromkeys(s for n in names for s in landmark_sources(n)))


def lookup(points: dict[str, np.ndarray], names: tuple[str, ...], dim: int) -> tuple[np.ndarray, list[str]]:
    """(len(names), dim) rows of ``points`` for ``names`` (case-insensitive; NaN where missing), and the missing names."""
    folded = {k.strip().casefold(): np.asarray(v, dtype=np.float64).reshape(dim) for k, v in points.items()}
    missing = [n for n in names if n.casefold() not in folded]
    rows = [folded.get(n.casefold(), np.full(dim, np.nan)) for n in names]
    return np.stack(rows), missing


# ---------------------------------------------------------------- the camera


@dataclasses.dataclass(frozen=True)
class CameraConversion:
    """DeepFluoro's ``proj-params`` as a pelmark camera plus the axis and image flips.

    Attributes:
        height, width: detector rows and columns.
        sdd_mm: source-to-detector distance, ``|K00| * pixel-col-spacing``.
        spacing_x_mm, spacing_y_mm: pixel sizes that give ``fx = |K00|`` and ``fy = |K11|``.
        cx_px, cy_px: pelmark's principal point (after the column mirror).
        axes: diagonal of ``S`` (DeepFluoro projective frame -> pelmark camera frame).
        mirror_columns: whether images and pixel columns are reversed (step 3).
        extrinsic: (4, 4) ``proj-params/extrinsic``.
    """

    height: int
    width: int
    sdd_mm: float
    spacing_x_mm: float
    spacing_y_mm: float
    cx_px: float
    cy_px: float
    axes: tuple[float, float, float]
    mirror_columns: bool
    extrinsic: np.ndarray

    def camera(self, sid_mm: float) -> Camera:
        """The full-resolution pelmark camera, its nominal C-arm ``sid_mm`` from the world origin."""
        return Camera(
            height=self.height,
            width=self.width,
            sdd_mm=self.sdd_mm,
            sid_mm=float(sid_mm),
            spacing_x_mm=self.spacing_x_mm,
            spacing_y_mm=self.spacing_y_mm,
            cx_px=self.cx_px,
            cy_px=self.cy_px,
        )

    def camera_rotation(self, rot_180: bool) -> np.ndarray:
        """(3, 3) ``R_up S``: DeepFluoro projective frame -> pelmark camera frame."""
        rotation = np.diag(self.axes)
        return R_UP @ rotation if rot_180 else rotation

    def pixels(self, points_px: np.ndarray, rot_180: bool) -> np.ndarray:
        """File pixel coordinates (..., 2) (column, row) -> pelmark pixels of the oriented image."""
        points = np.array(points_px, dtype=np.float64)
        if self.mirror_columns:
            points[..., 0] = self.width - 1.0 - points[..., 0]
        if rot_180:
            points[..., 0] = 2.0 * self.cx_px - points[..., 0]
            points[..., 1] = 2.0 * self.cy_px - points[..., 1]
        return points

    def image(self, image: np.ndarray, rot_180: bool) -> np.ndarray:
        """A (rows, columns) file image oriented like :meth:`pixels` (the caller's array is not changed).

        The 180° turn is about the principal point: an exact flip of both axes, then,
        when the principal point is off the image centre, a sub-pixel shift (linear
        interpolation, edge values repeated) by ``2 c - (n - 1)`` along each axis.
        """
        return self._orient(np.asarray(image, dtype=np.float64), rot_180, order=1)

    def labels(self, labels: np.ndarray, rot_180: bool) -> np.ndarray:
        """A (rows, columns) label map oriented like :meth:`image`, the sub-pixel shift by nearest neighbour."""
        return self._orient(np.asarray(labels), rot_180, order=0)

    def _orient(self, out: np.ndarray, rot_180: bool, order: int) -> np.ndarray:
        """:meth:`image`'s mirror, turn and sub-pixel shift, the shift interpolated at spline ``order``."""
        if self.mirror_columns:
            out = out[:, ::-1]
        if rot_180:
            out = out[::-1, ::-1]
            shift = (2.0 * self.cy_px - (self.height - 1.0), 2.0 * self.cx_px - (self.width - 1.0))
            if max(abs(s) for s in shift) > 1e-9:
                from scipy import ndimage

                out = ndimage.shift(out, shift, order=order, mode="nearest")
        return np.ascontiguousarray(out)

    def world_to_camera(self, cam_to_pelvis: np.ndarray, center_ras: np.ndarray, rot_180: bool) -> np.ndarray:
        """(4, 4) pelmark world -> pelmark camera frame of one projection: ``[R_up S] E T⁻¹ A``."""
        world_to_lps = np.eye(4)
        world_to_lps[:3, :3] = LPS_FLIP
        world_to_lps[:3, 3] = LPS_FLIP @ np.asarray(center_ras, dtype=np.float64)
        axes = np.eye(4)
        axes[:3, :3] = self.camera_rotation(rot_180)
        return axes @ self.extrinsic @ np.linalg.inv(cam_to_pelvis) @ world_to_lps


def camera_conversion(params: ProjectionParams, source: Path | None = None) -> CameraConversion:
    """Derive the pelmark camera and the flips from ``proj-params`` (steps 2 and 3 of the module docstring).

    Raises:
        PelmarkError: the intrinsic matrix is not a pinhole matrix pelmark can represent
            (skew, or a last row other than (0, 0, c)).
    """
    k = np.asarray(params.intrinsic, dtype=np.float64)
    if abs(k[2, 2]) < 1e-12 or np.any(np.abs(k[[1, 2, 2], [0, 0, 1]]) > 1e-9 * np.abs(k).max()):
        raise PelmarkError(f"proj-params/intrinsic is not a pinhole matrix: {k.tolist()}", source)
    k = k / k[2, 2]
    fx, fy = float(k[0, 0]), float(k[1, 1])
    if fx == 0.0 or fy == 0.0:
        raise PelmarkError(f"proj-params/intrinsic has a zero focal length: {k.tolist()}", source)
    # pelmark's camera has no skew; one that moves no point by 1e-3 px is round-off.
    if abs(k[0, 1]) * params.num_rows / abs(fy) > 1e-3:
        raise PelmarkError(f"proj-params/intrinsic has a skew pelmark cannot represent: {k.tolist()}", source)
    sx, sy = -float(np.sign(fx)), -float(np.sign(fy))
    mirror = bool(np.linalg.det(np.diag([sx, sy, -1.0])) < 0.0)
    cx = float(k[0, 2])
    if mirror:
        sx, cx = -sx, params.num_cols - 1.0 - cx
    sdd = abs(fx) * params.col_spacing_mm
    return CameraConversion(
        height=params.num_rows,
        width=params.num_cols,
        sdd_mm=sdd,
        spacing_x_mm=params.col_spacing_mm,
        spacing_y_mm=sdd / abs(fy),
        cx_px=cx,
        cy_px=float(k[1, 2]),
        axes=(sx, sy, -1.0),
        mirror_columns=mirror,
        extrinsic=np.asarray(params.extrinsic, dtype=np.float64),
    )


def lps_to_world(points_lps: np.ndarray, center_ras: np.ndarray) -> np.ndarray:
    """LPS mm -> pelmark world (RAS mm about the CT centre): ``F p - c``."""
    return np.asarray(points_lps, dtype=np.float64) @ LPS_FLIP.T - np.asarray(center_ras, dtype=np.float64)


def pose_of(world_to_camera: np.ndarray, camera: Camera) -> np.ndarray:
    """pelmark θ (6,) float64 of a world -> camera matrix."""
    return camera_to_pose(torch.from_numpy(np.asarray(world_to_camera, dtype=np.float64)), camera).numpy()


# ---------------------------------------------------------------- one projection


@dataclasses.dataclass(frozen=True)
class ConvertedProjection:
    """One projection in pelmark's conventions, with the conversion proof.

    Attributes:
        pose: (6,) θ.
        landmarks_px: (L, 2) the pelmark landmarks in full-resolution pelmark pixels: a
            DeepFluoro landmark's converted ``gt-landmarks``; a derived midline landmark's
            projection of its 3D point (see :data:`DERIVED_LANDMARKS`).
        depth_mm: (L,) depth of each pelmark landmark along the optical axis.
        errors_px: (K,) distance between the projection of each DeepFluoro landmark used
            and its converted ``gt-landmarks`` point, in full-resolution pixels.
    """

    pose: np.ndarray
    landmarks_px: np.ndarray
    depth_mm: np.ndarray
    errors_px: np.ndarray

    @property
    def max_error_px(self) -> float:
        return float(self.errors_px.max())

    @property
    def median_error_px(self) -> float:
        return float(np.median(self.errors_px))


def convert_projection(
    record: ProjectionRecord,
    specimen: SpecimenIndex,
    conversion: CameraConversion,
    camera: Camera,
    names: tuple[str, ...],
    rot_180: bool | None = None,
    source: Path | None = None,
) -> ConvertedProjection:
    """Convert one projection's pose and landmarks, and measure the conversion error.

    Args:
        record: the projection.
        specimen: its specimen (3D landmarks and CT geometry).
        conversion: from :func:`camera_conversion`.
        camera: the full-resolution pelmark camera (``conversion.camera(sid)``).
        names: pelmark landmark names (see :class:`LandmarkSet`).
        rot_180: override the file's ``rot-180-for-up`` for the pose only (the
            pixels always follow the file); only tests that prove a wrong
            convention fails should pass it.
        source: the file, for messages.

    Raises:
        PelmarkError: a needed landmark is missing from the projection's ``gt-landmarks``.
    """
    flip = record.rot_180_for_up if rot_180 is None else rot_180
    sources = required_sources(names)
    sources_world = _sources_world(specimen, sources, source)
    gt_file_px, missing = lookup(record.landmarks_px, sources, 2)
    if missing:
        raise PelmarkError(f"{record.h5_path}/gt-landmarks: missing {', '.join(missing)}", source)
    w2c = conversion.world_to_camera(record.cam_to_pelvis, specimen.volume.center_ras, flip)
    pose = pose_of(w2c, camera)

    gt_px = conversion.pixels(gt_file_px, record.rot_180_for_up)
    pose_t = torch.from_numpy(pose)[None]
    projected, depth_sources = project_with_depth(torch.from_numpy(sources_world)[None], pose_t, camera)
    if bool((depth_sources <= 0).any()):
        behind = [s for s, d in zip(sources, depth_sources[0].tolist()) if d <= 0]
        raise PelmarkError(
            f"{record.h5_path}: landmarks {', '.join(behind)} lie behind the X-ray source under the converted pose "
            "(the camera frame is not the documented one: Z must point towards the source)",
            source,
        )
    errors = np.linalg.norm(projected[0].numpy() - gt_px, axis=-1)

    index = {s: i for i, s in enumerate(sources)}
    world = np.stack([sources_world[[index[s] for s in landmark_sources(n)]].mean(0) for n in names])
    projected_names, depth = project_with_depth(torch.from_numpy(world)[None], pose_t, camera)
    landmarks_px = projected_names[0].numpy().copy()
    for i, name in enumerate(names):
        if len(landmark_sources(name)) == 1:
            landmarks_px[i] = gt_px[index[name]]
    return ConvertedProjection(pose=pose, landmarks_px=landmarks_px, depth_mm=depth[0].numpy(), errors_px=errors)


def landmarks_world(specimen: SpecimenIndex, names: tuple[str, ...], source: Path | None = None) -> np.ndarray:
    """(L, 3) pelmark world positions of ``names`` for a specimen.

    Raises:
        PelmarkError: a needed landmark is missing from ``vol-landmarks``.
    """
    sources = required_sources(names)
    world = _sources_world(specimen, sources, source)
    index = {s: i for i, s in enumerate(sources)}
    return np.stack([world[[index[s] for s in landmark_sources(n)]].mean(0) for n in names])


def _sources_world(specimen: SpecimenIndex, sources: tuple[str, ...], source: Path | None = None) -> np.ndarray:
    points_lps, missing = lookup(specimen.landmarks_lps, sources, 3)
    if missing:
        raise PelmarkError(f"/{specimen.name}/vol-landmarks: missing {', '.join(missing)}", source)
    return lps_to_world(points_lps, specimen.volume.center_ras)

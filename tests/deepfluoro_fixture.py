"""A tiny DeepFluoro full-resolution HDF5 file in exactly the documented layout, with a known camera.

The file's 2D ``gt-landmarks`` come from the layout document's own chain,
written out here with the matrices that go into the file::

    p_cam = E @ inv(T) @ p_lps        E: proj-params/extrinsic, T: gt-poses/cam-to-pelvis-vol
    q = K @ p_cam[:3]                 K: proj-params/intrinsic
    (column, row) = q[:2] / q[2]

and the camera follows the document's projective frame: X along increasing
columns, Y along increasing rows, Z pointing towards the source, so imaged
points have Z < 0 and K has negative focal lengths. Nothing here calls
pelmark's converter, so an import that reproduces these points proves its
conversion. The principal point is off the image centre and the detector is
not square, so swapped or mirrored axes show up.

Each projection's image is a raw intensity image (bright background) with one
dark Gaussian spot at a marker landmark (the one of the paper's side landmarks
farthest from the image centre while 4 px inside it), so image and landmark
orientation can be checked together.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from pelmark.landmark_sets import DEEPFLUORO_LANDMARKS, PAPER_LANDMARKS

SPECIMENS = ("17-1882", "18-0725")
ROWS, COLS = 48, 40
SDD_MM = 1000.0
COL_SPACING_MM, ROW_SPACING_MM = 2.5, 2.5
CX_PX, CY_PX = (COLS - 1) / 2 + 1.3, (ROWS - 1) / 2 - 2.1
VOLUME_SHAPE_ZYX = (22, 26, 24)  # row-major pixels: (slices, rows, columns)
VOLUME_SPACING_XYZ = (4.0, 3.6, 4.4)
SOURCE_DEPTH_MM = 600.0  # depth of the CT centre: the nominal source-to-isocentre distance
I0 = 20000.0

# Landmarks about the CT centre, LPS mm (x: patient's left, y: posterior, z: superior).
TEMPLATE_LPS = {
    "FH-l": (32.0, 4.0, -14.0), "FH-r": (-32.0, 4.0, -14.0),
    "GSN-l": (28.0, 22.0, 12.0), "GSN-r": (-28.0, 22.0, 12.0),
    "IOF-l": (14.0, -4.0, -30.0), "IOF-r": (-14.0, -4.0, -30.0),
    "MOF-l": (9.0, -7.0, -22.0), "MOF-r": (-9.0, -7.0, -22.0),
    "SPS-l": (3.0, -16.0, -9.0), "SPS-r": (-3.0, -16.0, -9.0),
    "IPS-l": (3.0, -12.0, -20.0), "IPS-r": (-3.0, -12.0, -20.0),
    "ASIS-l": (38.0, -14.0, 24.0), "ASIS-r": (-38.0, -14.0, 24.0),
}  # fmt: skip

# Rows are the camera axes in LPS: X = patient's left, Y = inferior (superior is up the raw image),
# Z = posterior, towards the source: a PA view, as with a C-arm's source under the table.
R_BASE = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def _rotation(axis, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def _rigid(rotation: np.ndarray, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation
    return matrix


INTRINSIC = np.array(
    [[-SDD_MM / COL_SPACING_MM, 0.0, CX_PX], [0.0, -SDD_MM / ROW_SPACING_MM, CY_PX], [0.0, 0.0, 1.0]]
)
EXTRINSIC = _rigid(_rotation((1.0, 2.0, 3.0), math.radians(30.0)), (10.0, -20.0, 30.0))


@dataclasses.dataclass(frozen=True)
class ProjectionTruth:
    key: str
    cam_to_pelvis: np.ndarray
    gt_px: dict[str, np.ndarray]
    rot_180_for_up: bool
    image: np.ndarray
    marker: str


@dataclasses.dataclass(frozen=True)
class SpecimenTruth:
    name: str
    origin_lps: np.ndarray
    landmarks_lps: dict[str, np.ndarray]
    projections: tuple[ProjectionTruth, ...]

    @property
    def center_lps(self) -> np.ndarray:
        shape_xyz = np.asarray(VOLUME_SHAPE_ZYX[::-1], dtype=np.float64)
        return self.origin_lps + np.asarray(VOLUME_SPACING_XYZ) * (shape_xyz - 1) / 2


def project_document(cam_to_pelvis: np.ndarray, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layout document's projection: (column, row) pixels and the camera-frame Z of each point."""
    homogeneous = np.concatenate([points_lps, np.ones((len(points_lps), 1))], axis=1)
    p_cam = (EXTRINSIC @ np.linalg.inv(cam_to_pelvis) @ homogeneous.T).T[:, :3]
    q = p_cam @ INTRINSIC.T
    return q[:, :2] / q[:, 2:], p_cam[:, 2]


def _image(marker_px: np.ndarray) -> np.ndarray:
    rows, cols = np.mgrid[0:ROWS, 0:COLS].astype(np.float64)
    # A faint left-right ramp keeps the image from being symmetric.
    attenuation = 0.3 + 0.002 * cols + 4.0 * np.exp(
        -((cols - marker_px[0]) ** 2 + (rows - marker_px[1]) ** 2) / (2 * 1.5**2)
    )
    return (I0 * np.exp(-attenuation)).astype(np.float32)


def _marker(gt: dict[str, np.ndarray]) -> str:
    centre = np.array([(COLS - 1) / 2, (ROWS - 1) / 2])
    inside = [
        n for n in PAPER_LANDMARKS
        if n in gt and 4 <= gt[n][0] <= COLS - 5 and 4 <= gt[n][1] <= ROWS - 5
    ]  # fmt: skip
    return max(inside, key=lambda n: float(np.linalg.norm(gt[n] - centre)))


def _write_image_group(group, pixels: np.ndarray, spacing, origin) -> None:
    group.create_dataset("dir-mat", data=np.eye(len(spacing)))
    group.create_dataset("origin", data=np.asarray(origin, dtype=np.float64))
    group.create_dataset("pixels", data=pixels)
    group.create_dataset("spacing", data=np.asarray(spacing, dtype=np.float64))


def write_deepfluoro_fixture(
    path: Path,
    projections: tuple[int, ...] = (3, 2),
    rot_180: tuple[tuple[bool, ...], ...] = ((False, True, False), (True, False)),
    seed: int = 0,
) -> tuple[SpecimenTruth, ...]:
    """Write the file; returns what went into it (the 2D points from the document's formula)."""
    import h5py

    rng = np.random.default_rng(seed)
    truths = []
    with h5py.File(path, "w") as f:
        params = f.create_group("proj-params")
        params.create_dataset("extrinsic", data=EXTRINSIC)
        params.create_dataset("intrinsic", data=INTRINSIC)
        params.create_dataset("num-cols", data=np.uint64(COLS))
        params.create_dataset("num-rows", data=np.uint64(ROWS))
        params.create_dataset("pixel-col-spacing", data=COL_SPACING_MM)
        params.create_dataset("pixel-row-spacing", data=ROW_SPACING_MM)

        for s, name in enumerate(SPECIMENS[: len(projections)]):
            group = f.create_group(name)
            origin = np.array([-46.0 + 5.0 * s, 120.0 - 3.0 * s, -950.5 + 7.0 * s])
            truth_origin = origin
            hu = np.full(VOLUME_SHAPE_ZYX, -1000.0, dtype=np.float32)
            hu[5:-5, 6:-6, 5:-5] = 300.0
            _write_image_group(group.create_group("vol"), hu, VOLUME_SPACING_XYZ, origin)
            seg = group.create_group("vol-seg")
            _write_image_group(seg.create_group("image"), (hu > 0).astype(np.uint8), VOLUME_SPACING_XYZ, origin)
            seg.create_group("labels-def").create_dataset("1", data="left-hemipelvis")

            shape_xyz = np.asarray(VOLUME_SHAPE_ZYX[::-1], dtype=np.float64)
            center_lps = origin + np.asarray(VOLUME_SPACING_XYZ) * (shape_xyz - 1) / 2
            landmarks = {
                n: center_lps + np.asarray(TEMPLATE_LPS[n]) + rng.uniform(-3.0, 3.0, 3) for n in DEEPFLUORO_LANDMARKS
            }
            lands = group.create_group("vol-landmarks")
            for n, point in landmarks.items():
                # The two specimens store points as (3,) and as (3, 1) columns.
                lands.create_dataset(n, data=point if s == 0 else point[:, None])

            records = []
            projs = group.create_group("projections")
            for p in range(projections[s]):
                key = f"{p:03d}"
                rotation = R_BASE @ _rotation(rng.normal(size=3), math.radians(rng.uniform(0.0, 20.0)))
                offset = np.array([rng.uniform(-12, 12), rng.uniform(-12, 12), -SOURCE_DEPTH_MM + rng.uniform(-40, 40)])
                # p_cam = M p_lps with M = [R | offset - R c]; the file stores T = inv(M) E so that E inv(T) = M.
                volume_to_camera = _rigid(rotation, offset - rotation @ center_lps)
                cam_to_pelvis = np.linalg.inv(volume_to_camera) @ EXTRINSIC
                names = list(landmarks)
                pixels, depth = project_document(cam_to_pelvis, np.stack([landmarks[n] for n in names]))
                assert np.all(depth < 0), "fixture landmarks must lie in front of the source (Z < 0)"
                gt = dict(zip(names, pixels))
                flip = rot_180[s][p]
                marker = _marker(gt)
                image = _image(gt[marker])

                proj = projs.create_group(key)
                _write_image_group(proj.create_group("image"), image, (COL_SPACING_MM, ROW_SPACING_MM), (0.0, 0.0))
                gt_group = proj.create_group("gt-landmarks")
                for n, point in gt.items():
                    gt_group.create_dataset(n, data=point if s == 0 else point[:, None])
                poses = proj.create_group("gt-poses")
                poses.create_dataset("cam-to-pelvis-vol", data=cam_to_pelvis)
                poses.create_dataset("cam-to-left-femur-vol", data=cam_to_pelvis)
                poses.create_dataset("cam-to-right-femur-vol", data=cam_to_pelvis)
                poses.create_dataset("left-femur-good-fov", data=np.uint8(1))
                poses.create_dataset("right-femur-good-fov", data=np.uint8(0))
                # The ground-truth segmentation marks the bright marker (label 1) in the file's own orientation.
                rows_grid, cols_grid = np.mgrid[0:ROWS, 0:COLS]
                marker_seg = (np.hypot(cols_grid - gt[marker][0], rows_grid - gt[marker][1]) <= 3.0).astype(np.uint8)
                _write_image_group(proj.create_group("gt-seg"), marker_seg, (COL_SPACING_MM, ROW_SPACING_MM), (0.0, 0.0))
                proj.create_dataset("rot-180-for-up", data=np.uint8(flip))
                records.append(ProjectionTruth(key, cam_to_pelvis, gt, flip, image, marker))
            truths.append(SpecimenTruth(name, truth_origin, landmarks, tuple(records)))
    return tuple(truths)


def write_preprocessed_layout(path: Path) -> None:
    """A file in DeepFluoro's *preprocessed* layout: a valid HDF5 file, but not the full-resolution one."""
    import h5py

    with h5py.File(path, "w") as f:
        names = f.create_group("land-names")
        names.create_dataset("num-lands", data=np.uint64(2))
        names.create_dataset("land-00", data="FH-l")
        names.create_dataset("land-01", data="FH-r")
        spec = f.create_group("01")
        spec.create_dataset("projs", data=np.zeros((1, 8, 8), np.float32))
        spec.create_dataset("segs", data=np.zeros((1, 8, 8), np.uint8))
        spec.create_dataset("lands", data=np.zeros((1, 2, 2), np.float32))

"""Reading the DeepFluoro full-resolution HDF5 file, checked against its documented layout.

The layout (Grupp et al., ``ipcai_2020_full_res_data.h5``)::

    proj-params/            extrinsic (4x4, world -> camera projective frame),
                            intrinsic (3x3), num-cols, num-rows,
                            pixel-col-spacing, pixel-row-spacing (mm / pixel)
    <specimen>/             every other top-level group is one specimen, e.g. 17-1882
        vol/                dir-mat, origin (LPS mm), pixels (row-major), spacing (x, y, z)
        vol-seg/            image/ (a volume group on vol's grid), labels-def/ <N> -> name; optional
        vol-landmarks/      <name> -> 3D point, LPS mm
        projections/<key>/  e.g. 005
            image/          pixels (rows, cols), origin, spacing, dir-mat
            gt-landmarks/   <name> -> (column, row), pixels
            gt-poses/       cam-to-pelvis-vol (4x4, camera world frame -> pelvis volume, LPS)
            gt-seg/         pixels (rows, cols) label values as vol-seg's; optional
            rot-180-for-up  0 or 1

"Row-major" pixels of a 3D ITK image put the x index last, so ``vol/pixels``
has numpy shape (slices, rows, columns) = (z, y, x); pelmark's
:class:`~pelmark.io.ct.CTVolume` wants (x, y, z) and gets the transpose.
Points may be stored as (n,), (n, 1) or (1, n) arrays.

:class:`DeepFluoroFile` checks every key, shape and transform it will use
when it opens the file, reading only small datasets, so an import fails on a
file in another layout before anything is written. Each problem is a
:class:`~pelmark.errors.PelmarkError` naming the file and the HDF5 path.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import NoReturn

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.ct import LPS_TO_RAS, CTVolume

PROJ_PARAMS = "proj-params"
_PROJ_PARAM_KEYS = ("extrinsic", "intrinsic", "num-cols", "num-rows", "pixel-col-spacing", "pixel-row-spacing")
_SPECIMEN_KEYS = ("vol", "vol-landmarks", "projections")
_IMAGE_KEYS = ("dir-mat", "origin", "pixels", "spacing")
_RIGID_TOLERANCE = 1e-4

# DeepFluoro's label names (``vol-seg/labels-def``) as pelmark's bone classes (landmark_sets.SEED003_CLASSES).
DEEPFLUORO_CLASS_NAMES = {
    "left-hemipelvis": "hemipelvis-l",
    "right-hemipelvis": "hemipelvis-r",
    "left-femur": "femur-l",
    "right-femur": "femur-r",
    "vertebrae": "vertebrae",
    "upper-sacrum": "upper-sacrum",
}


@dataclasses.dataclass(frozen=True)
class ProjectionParams:
    """``proj-params``: the one C-arm calibration shared by every projection.

    Attributes:
        intrinsic: (3, 3) map from the camera projective frame to (column, row, 1) up to scale.
        extrinsic: (4, 4) rigid map from the camera world frame to the camera projective frame.
        num_rows, num_cols: detector size in pixels.
        row_spacing_mm, col_spacing_mm: detector pixel size.
    """

    intrinsic: np.ndarray
    extrinsic: np.ndarray
    num_rows: int
    num_cols: int
    row_spacing_mm: float
    col_spacing_mm: float


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
    """The geometry of ``<specimen>/vol`` (its voxels are read only by :meth:`DeepFluoroFile.read_volume`).

    Attributes:
        shape_xyz: voxels along x (columns), y (rows) and z (slices).
        spacing_mm: voxel size along x, y, z.
        origin_lps: LPS position of the centre of voxel (0, 0, 0).
        direction: (3, 3) direction cosines (columns are the index axes in LPS).
    """

    shape_xyz: tuple[int, int, int]
    spacing_mm: np.ndarray
    origin_lps: np.ndarray
    direction: np.ndarray

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 map from voxel index (i, j, k, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * self.spacing_mm[None, :]
        affine[:3, 3] = self.origin_lps
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine_lps

    @property
    def center_ras(self) -> np.ndarray:
        """Scanner RAS position of the volume centre: the pelmark world origin."""
        index = (np.asarray(self.shape_xyz, dtype=np.float64) - 1.0) / 2.0
        return self.affine_ras[:3, :3] @ index + self.affine_ras[:3, 3]


@dataclasses.dataclass(frozen=True)
class ProjectionRecord:
    """One projection's small data (the image is read on demand).

    Attributes:
        specimen: the specimen group's name.
        key: the projection's name inside ``projections`` (e.g. ``005``).
        landmarks_px: name -> (column, row) in the file's pixels.
        cam_to_pelvis: (4, 4) ``gt-poses/cam-to-pelvis-vol``.
        rot_180_for_up: whether the image must turn 180° for the patient to be up.
    """

    specimen: str
    key: str
    landmarks_px: dict[str, np.ndarray]
    cam_to_pelvis: np.ndarray
    rot_180_for_up: bool

    @property
    def h5_path(self) -> str:
        return f"/{self.specimen}/projections/{self.key}"


@dataclasses.dataclass(frozen=True)
class SpecimenIndex:
    """A specimen's geometry, 3D landmarks (LPS mm) and projections, in file order."""

    name: str
    volume: VolumeGeometry
    landmarks_lps: dict[str, np.ndarray]
    projections: tuple[ProjectionRecord, ...]


def _natural_key(key: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


class DeepFluoroFile:
    """An open DeepFluoro full-resolution file whose layout has been checked.

    Use as a context manager::

        with DeepFluoroFile(path) as source:
            for specimen in source.specimens: ...

    Raises:
        PelmarkError: the file is missing, not HDF5, or not in the documented layout.
    """

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise PelmarkError("DeepFluoro file not found", self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise PelmarkError(f"not a readable HDF5 file ({exc})", self.path) from None
        try:
            self.params = self._read_params()
            names = sorted((k for k in self._file.keys() if k != PROJ_PARAMS), key=_natural_key)
            if not names:
                self._fail("/", "no specimen groups beside 'proj-params'")
            self.specimens = tuple(self._read_specimen(name) for name in names)
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------ access

    def __enter__(self) -> "DeepFluoroFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def specimen_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specimens)

    def specimen(self, name: str) -> SpecimenIndex:
        for specimen in self.specimens:
            if specimen.name == name:
                return specimen
        raise PelmarkError(f"no specimen {name!r} in this file (specimens: {', '.join(self.specimen_names)})", self.path)

    def read_volume(self, specimen: SpecimenIndex) -> CTVolume:
        """The specimen's CT, voxel values as stored (HU), with its RAS affine."""
        pixels = np.asarray(self._file[f"{specimen.name}/vol/pixels"][()], dtype=np.float32)
        if not np.all(np.isfinite(pixels)):
            self._fail(f"/{specimen.name}/vol/pixels", "contains NaN or infinite voxels")
        hu = np.ascontiguousarray(np.transpose(pixels, (2, 1, 0)))
        return CTVolume(hu=hu, affine_ras=specimen.volume.affine_ras, source=self.path)

    def read_image(self, record: ProjectionRecord) -> np.ndarray:
        """The projection's pixels, (rows, columns) float64, as stored."""
        where = f"{record.h5_path}/image/pixels"
        image = np.asarray(self._file[where.lstrip("/")][()], dtype=np.float64)
        if not np.all(np.isfinite(image)):
            self._fail(where, "contains NaN or infinite pixels")
        return image

    def has_segmentation(self) -> bool:
        """Every specimen has ``vol-seg`` (an image and ``labels-def``) and every projection a ``gt-seg``."""
        for specimen in self.specimens:
            if f"{specimen.name}/vol-seg/image/pixels" not in self._file or f"{specimen.name}/vol-seg/labels-def" not in self._file:
                return False
            if any(f"{record.h5_path}/gt-seg/pixels".lstrip("/") not in self._file for record in specimen.projections):
                return False
        return True

    def label_names(self, specimen: SpecimenIndex) -> dict[int, str]:
        """``vol-seg/labels-def``: label value -> name."""
        where = f"/{specimen.name}/vol-seg/labels-def"
        names = {}
        for key, node in self._group(where).items():
            if not key.isdigit() or not 1 <= int(key) <= 255:
                self._fail(f"{where}/{key}", "label values must be whole numbers from 1 to 255")
            value = node[()]
            names[int(key)] = value.decode() if isinstance(value, bytes) else str(value)
        return names

    def read_volume_labels(self, specimen: SpecimenIndex) -> np.ndarray:
        """``vol-seg/image``'s labels, (x, y, z) uint8, which must be on ``vol``'s grid."""
        where = f"/{specimen.name}/vol-seg/image"
        self._group(where, _IMAGE_KEYS)
        pixels = np.asarray(self._file[f"{where}/pixels".lstrip("/")][()])
        shape_xyz = tuple(int(s) for s in pixels.shape[::-1])
        if shape_xyz != specimen.volume.shape_xyz:
            self._fail(f"{where}/pixels", f"has shape {pixels.shape}, not vol's {specimen.volume.shape_xyz[::-1]}")
        for key, value in (("origin", specimen.volume.origin_lps), ("spacing", specimen.volume.spacing_mm)):
            if not np.allclose(self._array(f"{where}/{key}", size=3), value, atol=1e-3):
                self._fail(f"{where}/{key}", f"differs from vol's ({np.round(value, 3).tolist()}): not on the CT's grid")
        return self._labels(where, pixels, (2, 1, 0))

    def read_projection_labels(self, record: ProjectionRecord) -> np.ndarray:
        """The projection's ``gt-seg`` labels, (rows, columns) uint8, as stored."""
        where = f"{record.h5_path}/gt-seg"
        pixels = np.asarray(self._file[f"{where}/pixels".lstrip("/")][()])
        expected = (self.params.num_rows, self.params.num_cols)
        if pixels.shape != expected:
            self._fail(f"{where}/pixels", f"has shape {pixels.shape}, expected (num-rows, num-cols) = {expected}")
        return self._labels(where, pixels, (0, 1))

    def _labels(self, where: str, pixels: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255 or np.any(pixels != np.round(pixels))):
            self._fail(f"{where}/pixels", "label values must be whole numbers from 0 to 255")
        return np.ascontiguousarray(np.transpose(pixels, axes).astype(np.uint8))

    # ------------------------------------------------------------ checking

    def _fail(self, where: str, problem: str) -> NoReturn:
        raise PelmarkError(f"{where}: {problem} (not the documented DeepFluoro full-resolution layout)", self.path)

    def _group(self, where: str, keys: tuple[str, ...] = ()):
        import h5py

        node = self._file.get(where.lstrip("/"))
        if node is None:
            self._fail(where, "missing")
        if not isinstance(node, h5py.Group):
            self._fail(where, "is a dataset, expected a group")
        for key in keys:
            if key not in node:
                found = ", ".join(sorted(node.keys())) or "nothing"
                self._fail(f"{where}/{key}".replace("//", "/"), f"missing (found: {found})")
        return node

    def _array(self, where: str, shape: tuple[int, ...] | None = None, size: int | None = None) -> np.ndarray:
        import h5py

        node = self._file.get(where.lstrip("/"))
        if node is None:
            self._fail(where, "missing")
        if not isinstance(node, h5py.Dataset):
            self._fail(where, "is a group, expected a dataset")
        try:
            value = np.asarray(node[()], dtype=np.float64)
        except (TypeError, ValueError):
            self._fail(where, f"is not numeric (dtype {node.dtype})")
        if shape is not None and value.shape != shape:
            self._fail(where, f"has shape {value.shape}, expected {shape}")
        if size is not None:
            if value.size != size:
                self._fail(where, f"has {value.size} values, expected {size}")
            value = value.reshape(size)
        if not np.all(np.isfinite(value)):
            self._fail(where, "contains NaN or infinite values")
        return value

    def _rigid(self, where: str) -> np.ndarray:
        matrix = self._array(where, shape=(4, 4))
        rotation = matrix[:3, :3]
        orthonormal = np.allclose(rotation @ rotation.T, np.eye(3), atol=_RIGID_TOLERANCE)
        if not (orthonormal and np.linalg.det(rotation) > 0 and np.allclose(matrix[3], [0, 0, 0, 1])):
            self._fail(where, "is not a rigid 4x4 transform (rotation and translation)")
        return matrix

    def _read_params(self) -> ProjectionParams:
        if PROJ_PARAMS not in self._file:
            found = ", ".join(sorted(self._file.keys())[:8]) or "nothing"
            self._fail(f"/{PROJ_PARAMS}", f"missing (top-level keys: {found})")
        where = f"/{PROJ_PARAMS}"
        self._group(where, _PROJ_PARAM_KEYS)
        params = ProjectionParams(
            intrinsic=self._array(f"{where}/intrinsic", shape=(3, 3)),
            extrinsic=self._rigid(f"{where}/extrinsic"),
            num_rows=int(self._array(f"{where}/num-rows", size=1)[0]),
            num_cols=int(self._array(f"{where}/num-cols", size=1)[0]),
            row_spacing_mm=float(self._array(f"{where}/pixel-row-spacing", size=1)[0]),
            col_spacing_mm=float(self._array(f"{where}/pixel-col-spacing", size=1)[0]),
        )
        if min(params.num_rows, params.num_cols) < 1 or min(params.row_spacing_mm, params.col_spacing_mm) <= 0:
            self._fail(where, "detector size and pixel spacing must be positive")
        return params

    def _read_specimen(self, name: str) -> SpecimenIndex:
        where = f"/{name}"
        self._group(where, _SPECIMEN_KEYS)
        self._group(f"{where}/vol", _IMAGE_KEYS)
        pixels = self._file[f"{name}/vol/pixels"]
        if len(pixels.shape) != 3:
            self._fail(f"{where}/vol/pixels", f"has shape {pixels.shape}, expected a 3D (z, y, x) volume")
        direction = self._array(f"{where}/vol/dir-mat", shape=(3, 3))
        if not np.allclose(direction @ direction.T, np.eye(3), atol=_RIGID_TOLERANCE):
            self._fail(f"{where}/vol/dir-mat", "is not a rotation matrix")
        spacing = self._array(f"{where}/vol/spacing", size=3)
        if np.any(spacing <= 0):
            self._fail(f"{where}/vol/spacing", "must be positive")
        volume = VolumeGeometry(
            shape_xyz=tuple(int(s) for s in pixels.shape[::-1]),
            spacing_mm=spacing,
            origin_lps=self._array(f"{where}/vol/origin", size=3),
            direction=direction,
        )
        landmarks = self._points(f"{where}/vol-landmarks", 3)
        if not landmarks:
            self._fail(f"{where}/vol-landmarks", "has no landmarks")
        keys = sorted(self._group(f"{where}/projections").keys(), key=_natural_key)
        if not keys:
            self._fail(f"{where}/projections", "has no projections")
        records = tuple(self._read_projection(name, key) for key in keys)
        return SpecimenIndex(name=name, volume=volume, landmarks_lps=landmarks, projections=records)

    def _points(self, where: str, dim: int) -> dict[str, np.ndarray]:
        group = self._group(where)
        return {key: self._array(f"{where}/{key}", size=dim) for key in group.keys()}

    def _read_projection(self, specimen: str, key: str) -> ProjectionRecord:
        where = f"/{specimen}/projections/{key}"
        self._group(where, ("image", "gt-landmarks", "gt-poses", "rot-180-for-up"))
        self._group(f"{where}/image", _IMAGE_KEYS)
        image_shape = tuple(self._file[f"{where}/image/pixels".lstrip("/")].shape)
        expected = (self.params.num_rows, self.params.num_cols)
        if image_shape != expected:
            self._fail(f"{where}/image/pixels", f"has shape {image_shape}, expected (num-rows, num-cols) = {expected}")
        landmarks = self._points(f"{where}/gt-landmarks", 2)
        if not landmarks:
            self._fail(f"{where}/gt-landmarks", "has no landmarks")
        self._group(f"{where}/gt-poses", ("cam-to-pelvis-vol",))
        flag = self._array(f"{where}/rot-180-for-up", size=1)[0]
        if flag not in (0.0, 1.0):
            self._fail(f"{where}/rot-180-for-up", f"is {flag:g}, expected 0 or 1")
        return ProjectionRecord(
            specimen=specimen,
            key=key,
            landmarks_px=landmarks,
            cam_to_pelvis=self._rigid(f"{where}/gt-poses/cam-to-pelvis-vol"),
            rot_180_for_up=bool(flag),
        )

"""CT volumes: reading through SimpleITK, the RAS affine, and the pelmark world frame.

SimpleITK reports geometry in LPS (origin, spacing, direction cosines). pelmark
keeps the voxel array in SimpleITK's index order (i, j, k) = (x, y, z) index,
and a 4x4 affine from that index to scanner RAS mm. The world frame of
:mod:`pelmark.geometry` is that RAS frame shifted so the volume centre,
``affine @ ((shape - 1) / 2)``, is the origin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import math
import struct
from pathlib import Path

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.atomic import atomic_path

# The one statement of the patient-frame flip: x and y change sign between LPS (DICOM, ITK,
# SimpleITK, Slicer's default) and RAS (pelmark's world); z does not. The map is its own
# inverse, so it also takes RAS to LPS.
LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])
LPS_TO_RAS = np.diag([*LPS_RAS_FLIP, 1.0])  # the same flip for 4x4 affines (and RAS_TO_LPS)
CT_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclasses.dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT in Hounsfield units with its geometry.

    Attributes:
        hu: (I, J, K) float32 array, indexed like the affine's columns.
        affine_ras: 4x4 map from voxel index (i, j, k, 1) to scanner RAS mm.
        source: where it was read from, for messages.
    """

    hu: np.ndarray
    affine_ras: np.ndarray
    source: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine_ras[:3, :3], axis=0)

    @property
    def center_ras(self) -> np.ndarray:
        """Scanner RAS position of the volume centre, the pelmark world origin."""
        index = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine_ras[:3, :3] @ index + self.affine_ras[:3, 3]

    @property
    def affine_world(self) -> np.ndarray:
        """4x4 map from voxel index to the pelmark world frame (centred RAS mm)."""
        affine = self.affine_ras.copy()
        affine[:3, 3] -= self.center_ras
        return affine

    def ras_to_world(self, points_ras: np.ndarray) -> np.ndarray:
        return np.asarray(points_ras, dtype=np.float64) - self.center_ras

    def world_to_ras(self, points_world: np.ndarray) -> np.ndarray:
        return np.asarray(points_world, dtype=np.float64) + self.center_ras

    def world_to_index(self, points_world: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (..., 3) of world points."""
        inv = np.linalg.inv(self.affine_world)
        pts = np.asarray(points_world, dtype=np.float64)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def contains_world(self, points_world: np.ndarray) -> np.ndarray:
        """True where a world point lies inside the volume (voxel edges included)."""
        idx = self.world_to_index(points_world)
        upper = np.asarray(self.shape, dtype=np.float64) - 0.5
        return np.all((idx >= -0.5) & (idx <= upper), axis=-1)

    def bounds_world(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world bounding box of the volume's voxel edges."""
        corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in self.shape], indexing="ij"))
        corners = corners.reshape(3, -1).T
        world = corners @ self.affine_world[:3, :3].T + self.affine_world[:3, 3]
        return world.min(0), world.max(0)

    def digest(self) -> str:
        """sha256 of the voxels and the affine: identifies the CT in a store's provenance."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.hu, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.affine_ras, dtype=np.float64).tobytes())
        h.update(repr(self.shape).encode())
        return h.hexdigest()


def _affine_from_sitk(image) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing[None, :]
    affine_lps[:3, 3] = origin
    return LPS_TO_RAS @ affine_lps


def ct_from_sitk(image, source: Path | None = None) -> CTVolume:
    """A :class:`CTVolume` from a 3D SimpleITK image (array transposed to (i, j, k))."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise PelmarkError(f"expected a 3D volume, found {image.GetDimension()}D", source)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PelmarkError("expected a scalar (single-channel) CT volume", source)
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (k, j, i)
    hu = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    return CTVolume(hu=hu, affine_ras=_affine_from_sitk(image), source=source)


def ct_to_sitk(ct: CTVolume):
    """The SimpleITK image (LPS geometry) of a :class:`CTVolume`."""
    return sitk_image(ct.hu, ct.affine_ras)


def sitk_image(array_ijk: np.ndarray, affine_ras: np.ndarray):
    """The SimpleITK image (LPS geometry) of an (i, j, k) voxel array with its RAS affine."""
    import SimpleITK as sitk

    affine_lps = LPS_TO_RAS @ affine_ras
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    direction = affine_lps[:3, :3] / spacing[None, :]
    image = sitk.GetImageFromArray(np.transpose(array_ijk, (2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in affine_lps[:3, 3]))
    image.SetDirection(tuple(float(d) for d in direction.ravel()))
    return image


def _ct_suffix(path: Path) -> str | None:
    """The CT suffix of a file name (lower case), or None; ``.nii.gz`` wins over ``.gz``."""
    name = path.name.lower()
    return next((s for s in sorted(CT_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _sitk_reason(exc: RuntimeError) -> str:
    """The last ``ERROR:`` line of a SimpleITK exception: ITK's messages span several lines."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR:" in line]
    line = errors[-1] if errors else (lines[-1] if lines else "unknown error")
    return line.split("ERROR:", 1)[-1].strip()


def _read_dicom_series(folder: Path):
    """The largest DICOM series in ``folder`` (by number of files), as a SimpleITK image."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    # GDCM prints "No Series were found" to stderr; the PelmarkError below says it in one line.
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series_ids = sorted(reader.GetGDCMSeriesIDs(str(folder)))
        files = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
    if not series_ids:
        raise PelmarkError("no DICOM series found in this folder", folder)
    largest = max(series_ids, key=lambda sid: len(files[sid]))
    reader.SetFileNames(files[largest])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise PelmarkError(f"unreadable DICOM series ({_sitk_reason(exc)})", folder) from None


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32, float64


def _nifti_nonfinite_counts(path: Path) -> tuple[int, int]:
    """NaN and infinite voxel counts of a float NIfTI file, read from the file itself.

    ITK's NIfTI reader (nifti1_io) silently replaces non-finite floats with 0,
    so the array SimpleITK returns cannot show them. Integer files hold none.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as file:
        header = file.read(540)
        if len(header) < 348:
            return 0, 0
        # sizeof_hdr (348 for NIfTI-1, 540 for NIfTI-2) also tells the byte order.
        sizes = {e: struct.unpack(e + "i", header[:4])[0] for e in "<>"}
        endian = next((e for e, size in sizes.items() if size in (348, 540)), None)
        if endian is None:
            return 0, 0
        if sizes[endian] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
        else:  # NIfTI-2
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
        if datatype not in _NIFTI_FLOAT_TYPES:
            return 0, 0
        dtype = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
        remaining = math.prod(max(int(d), 1) for d in dims[1 : 1 + dims[0]])
        file.seek(vox_offset)
        n_nan = n_inf = 0
        while remaining > 0:
            chunk = np.frombuffer(file.read(min(remaining, 1 << 24) * dtype.itemsize), dtype=dtype)
            if chunk.size == 0:
                break
            n_nan += int(np.isnan(chunk).sum())
            n_inf += int(np.isinf(chunk).sum())
            remaining -= chunk.size
    return n_nan, n_inf


def load_ct(path: str | Path) -> CTVolume:
    """Read a CT (NIfTI, NRRD, MetaImage, or a DICOM series folder) with its RAS affine.

    Every failure (missing or corrupt file, wrong dimension, NaN or infinite
    voxels) is a :class:`PelmarkError` naming ``path``, so the CLI reports one
    line instead of an ITK traceback.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise PelmarkError("CT not found", path)
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        if _ct_suffix(path) is None:
            raise PelmarkError(
                f"unsupported CT file type (expected a DICOM folder or one of {', '.join(CT_SUFFIXES)})", path
            )
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise PelmarkError(f"unreadable or corrupt image file ({_sitk_reason(exc)})", path) from None
    ct = ct_from_sitk(image, source=path)
    if _ct_suffix(path) in (".nii", ".nii.gz"):
        try:
            n_nan, n_inf = _nifti_nonfinite_counts(path)
        except (OSError, EOFError) as exc:
            raise PelmarkError(f"unreadable or corrupt image file ({exc})", path) from None
    else:
        n_nan, n_inf = int(np.isnan(ct.hu).sum()), int(np.isinf(ct.hu).sum())
    if n_nan:
        raise PelmarkError(f"contains {n_nan} NaN voxels", path)
    if n_inf:
        raise PelmarkError(f"contains {n_inf} infinite voxels", path)
    return ct


def save_ct(ct: CTVolume, path: str | Path) -> None:
    """Write a CT as float32 HU to a NIfTI, NRRD or MetaImage file chosen by suffix.

    Single-file formats are written to a temporary name and renamed, so a
    crash never leaves a truncated volume under the final name. Detached
    headers (``.mhd``, ``.nhdr``) name their data file, so those are written in place.
    """
    path = Path(path)
    suffix = _ct_suffix(path)
    if suffix is None:
        expected = ", ".join(CT_SUFFIXES)
        raise PelmarkError(f"unsupported CT file type for writing (expected one of {expected})", path)
    write_sitk_image(ct_to_sitk(CTVolume(hu=np.asarray(ct.hu, dtype=np.float32), affine_ras=ct.affine_ras)), path, "CT")


def write_sitk_image(image, path: Path, what: str) -> None:
    """Write a SimpleITK image by ``path``'s suffix (compressed but for ``.nii``), atomically for one-file formats.

    Detached headers (``.mhd``, ``.nhdr``) name their data file, so those are written in place.

    Raises:
        PelmarkError: SimpleITK cannot write it ("cannot write ``what`` (...)").
    """
    import SimpleITK as sitk

    suffix = _ct_suffix(path)
    detached = suffix in (".mhd", ".nhdr")
    try:
        with (contextlib.nullcontext(path) if detached else atomic_path(path, suffix)) as target:
            sitk.WriteImage(image, str(target), useCompression=suffix != ".nii")
    except RuntimeError as exc:
        if detached:
            path.unlink(missing_ok=True)
        raise PelmarkError(f"cannot write {what} ({_sitk_reason(exc)})", path) from None

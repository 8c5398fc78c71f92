"""Bone label volumes: one uint8 class per voxel on a CT's grid (0 = background, ``k + 1`` = class ``k``).

A label volume belongs to one CT and must share its grid exactly: the same
shape, voxel spacing, direction and origin (to 1e-3 mm), so that the label of
voxel (i, j, k) is the bone at the CT's voxel (i, j, k). The renderer then
projects both with the same rays (:meth:`pelmark.synth.render.DRRRenderer.render_labels`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume, _affine_from_sitk, _ct_suffix, _sitk_reason, sitk_image, write_sitk_image

# How far two grids' voxel centres may be apart and still count as one grid (mm).
GRID_TOLERANCE_MM = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)
class LabelVolume:
    """A label volume with its geometry.

    Attributes:
        labels: (I, J, K) uint8 class values, indexed like the affine's columns.
        affine_ras: 4x4 map from voxel index (i, j, k, 1) to scanner RAS mm.
        source: where it was read from, for messages.
    """

    labels: np.ndarray
    affine_ras: np.ndarray
    source: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.labels.shape)


def labels_digest(volume: LabelVolume) -> str:
    """sha256 of a label volume's values and geometry (what decides the label maps rendered from it)."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(volume.labels, dtype=np.uint8).tobytes())
    h.update(str(volume.shape).encode())
    h.update(np.ascontiguousarray(volume.affine_ras, dtype=np.float64).tobytes())
    return h.hexdigest()


def load_labels(path: str | Path) -> LabelVolume:
    """Read a label volume (NIfTI, NRRD or MetaImage) with its RAS affine.

    Raises:
        PelmarkError: the file is missing, unreadable, not 3D and scalar, or holds values that are not
            whole numbers from 0 to 255.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise PelmarkError("segmentation not found", path)
    if _ct_suffix(path) is None:
        raise PelmarkError("unsupported segmentation file type (expected .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd)", path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise PelmarkError(f"unreadable or corrupt segmentation ({_sitk_reason(exc)})", path) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PelmarkError(f"a segmentation must be a scalar 3D volume, found {image.GetDimension()}D", path)
    values = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 255 or np.any(values != np.round(values))):
        raise PelmarkError("segmentation values must be whole numbers from 0 to 255 (0 = background)", path)
    return LabelVolume(np.ascontiguousarray(values.astype(np.uint8)), _affine_from_sitk(image), path)


def save_labels(labels: np.ndarray, affine_ras: np.ndarray, path: str | Path) -> None:
    """Write a uint8 label volume (compressed NIfTI, NRRD or MetaImage by suffix), atomically for one-file formats."""
    path = Path(path)
    if _ct_suffix(path) is None:
        raise PelmarkError("unsupported segmentation file type for writing", path)
    write_sitk_image(sitk_image(np.asarray(labels, dtype=np.uint8), affine_ras), path, "segmentation")


def grid_differences(labels: LabelVolume, ct: CTVolume) -> list[str]:
    """How the label volume's grid differs from the CT's, in words ([] when they are one grid)."""
    if labels.shape != ct.shape:
        return [f"shape {'x'.join(map(str, labels.shape))} (CT: {'x'.join(map(str, ct.shape))})"]
    differs = []
    spacing, ct_spacing = np.linalg.norm(labels.affine_ras[:3, :3], axis=0), ct.spacing_mm
    if not np.allclose(spacing, ct_spacing, atol=1e-6, rtol=1e-6):
        differs.append(f"voxel spacing {_shown(spacing)} mm (CT: {_shown(ct_spacing)} mm)")
    direction = labels.affine_ras[:3, :3] / spacing[None, :]
    if not np.allclose(direction, ct.affine_ras[:3, :3] / ct_spacing[None, :], atol=1e-6):
        differs.append("direction (axis orientation)")
    offset = labels.affine_ras[:3, 3] - ct.affine_ras[:3, 3]
    if np.abs(offset).max() > GRID_TOLERANCE_MM:
        differs.append(f"origin, {np.linalg.norm(offset):.3g} mm from the CT's")
    return differs


def _shown(values: np.ndarray) -> str:
    return " x ".join(f"{v:g}" for v in values)


def check_label_grid(labels: LabelVolume, ct: CTVolume, subject_id: str) -> None:
    """Refuse a label volume that is not on its CT's grid, saying how it differs."""
    differs = grid_differences(labels, ct)
    if differs:
        raise PelmarkError(f"subject {subject_id!r}: segmentation is not on the CT's grid: {'; '.join(differs)}", labels.source)

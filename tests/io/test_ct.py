"""Reading and writing CTs: formats, orientation, bad inputs, and a real scan."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume, load_ct, save_ct

REAL_CT_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-ct"
FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _oblique_ct(shape: tuple[int, int, int] = (6, 7, 5), seed: int = 0) -> CTVolume:
    """Integer-valued HU (exact in any format) on an oblique, anisotropic grid."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 2000, size=shape).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = _rotation_z(30.0) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-100.5, 42.25, 310.0]
    return CTVolume(hu=hu, affine_ras=affine)


def _sitk_image(array_ijk: np.ndarray, spacing, origin_lps, direction_lps: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin_lps))
    image.SetDirection(tuple(float(d) for d in np.asarray(direction_lps).ravel()))
    return image


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> None:
    """One file per slice, with the position and orientation tags a scanner writes."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        slice_k.SetMetaData("0008|0060", "CT")
        slice_k.SetMetaData("0020|000e", series_uid)
        slice_k.SetMetaData("0020|0037", orientation)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_k.SetMetaData("0020|0032", "\\".join(str(v) for v in position))
        slice_k.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_k)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    ct = _oblique_ct()
    path = tmp_path / f"ct{suffix}"
    save_ct(ct, path)
    loaded = load_ct(path)
    assert loaded.shape == ct.shape
    np.testing.assert_array_equal(loaded.hu, ct.hu)
    np.testing.assert_allclose(loaded.affine_ras, ct.affine_ras, atol=1e-4)
    assert loaded.source == path
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_dicom_series_round_trip(tmp_path: Path) -> None:
    ct = _oblique_ct(shape=(8, 6, 5))
    image = _sitk_image(
        ct.hu.astype(np.int16),
        spacing=[0.8, 0.9, 2.5],
        origin_lps=[100.5, -42.25, 310.0],
        direction_lps=np.diag([-1.0, -1.0, 1.0]) @ _rotation_z(30.0),
    )
    _write_dicom_series(image, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.111")
    loaded = load_ct(tmp_path / "dicom")
    np.testing.assert_array_equal(loaded.hu, ct.hu)
    np.testing.assert_allclose(loaded.affine_ras, ct.affine_ras, atol=1e-4)


def test_dicom_folder_with_two_series_reads_the_larger(tmp_path: Path) -> None:
    small = _sitk_image(np.zeros((4, 4, 3)), [1, 1, 1], [0, 0, 0], np.eye(3))
    large = _sitk_image(np.full((4, 4, 6), 7.0), [1, 1, 1], [0, 0, 50], np.eye(3))
    _write_dicom_series(small, tmp_path, "1.2.826.0.1.3680043.2.1125.1.201")
    _write_dicom_series(large, tmp_path, "1.2.826.0.1.3680043.2.1125.1.202")
    loaded = load_ct(tmp_path)
    assert loaded.shape == (4, 4, 6)
    assert np.all(loaded.hu == 7.0)


# ---------------------------------------------------------------- orientation


def test_lps_header_gives_hand_computed_ras_affine(tmp_path: Path) -> None:
    image = _sitk_image(np.zeros((3, 3, 3)), [2.0, 2.0, 2.0], [10.0, 20.0, 30.0], np.eye(3))
    sitk.WriteImage(image, str(tmp_path / "ct.mha"))
    ct = load_ct(tmp_path / "ct.mha")
    # LPS (10, 20, 30) is RAS (-10, -20, 30); an index step along +L/+P is -2 mm in R/A.
    expected = np.array([[-2, 0, 0, -10], [0, -2, 0, -20], [0, 0, 2, 30], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(ct.affine_ras, expected)
    # The centre voxel (1, 1, 1) sits at RAS (-12, -22, 32), the world origin.
    np.testing.assert_allclose(ct.center_ras, [-12.0, -22.0, 32.0])


@pytest.mark.parametrize("suffix", (".nii.gz", ".nrrd", ".mha"))
def test_permuted_flipped_axes_give_same_world_position(tmp_path: Path, suffix: str) -> None:
    shape_a = (6, 7, 8)
    hu_a = np.zeros(shape_a, dtype=np.float32)
    hu_a[1, 2, 5] = 1000.0
    spacing_a = np.array([1.0, 2.0, 3.0])
    direction_a = _rotation_z(20.0)
    origin_a = np.array([5.0, -7.0, 11.0])

    # Storage B: axes (k, i, j) of A with the second one reversed, so index_a = M index_b + c.
    hu_b = np.ascontiguousarray(np.flip(np.transpose(hu_a, (2, 0, 1)), axis=1))
    m = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    c = np.array([shape_a[0] - 1.0, 0.0, 0.0])
    linear_b = direction_a @ np.diag(spacing_a) @ m
    spacing_b = np.linalg.norm(linear_b, axis=0)
    direction_b = linear_b / spacing_b
    origin_b = direction_a @ np.diag(spacing_a) @ c + origin_a
    assert hu_b.shape == (8, 6, 7) and np.linalg.det(direction_b) < 0

    positions = []
    for name, (hu, spacing, origin, direction) in {
        "a": (hu_a, spacing_a, origin_a, direction_a),
        "b": (hu_b, spacing_b, origin_b, direction_b),
    }.items():
        path = tmp_path / f"{name}{suffix}"
        sitk.WriteImage(_sitk_image(hu, spacing, origin, direction), str(path))
        ct = load_ct(path)
        index = np.array(np.unravel_index(np.argmax(ct.hu), ct.shape), dtype=float)
        positions.append((ct.affine_world[:3, :3] @ index + ct.affine_world[:3, 3], ct.center_ras))
    (world_a, center_a), (world_b, center_b) = positions
    np.testing.assert_allclose(world_b, world_a, atol=1e-3)
    np.testing.assert_allclose(center_b, center_a, atol=1e-3)
    # A's bright voxel by hand: LPS = origin + D (spacing * index); RAS negates x and y.
    expected_lps = direction_a @ (spacing_a * [1, 2, 5]) + origin_a
    np.testing.assert_allclose(world_a + center_a, expected_lps * [-1, -1, 1], atol=1e-3)


def test_oblique_nifti_affine_matches_nibabel(tmp_path: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    ct = _oblique_ct()
    path = tmp_path / "ct.nii.gz"
    save_ct(ct, path)
    np.testing.assert_allclose(load_ct(path).affine_ras, nibabel.load(path).affine, atol=1e-4)


# ---------------------------------------------------------------- bad inputs


def _raises_naming(path: Path, match: str) -> PelmarkError:
    with pytest.raises(PelmarkError, match=match) as info:
        load_ct(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "absent.nii.gz", "not found")


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(600))
    _raises_naming(path, "unreadable or corrupt")


@pytest.mark.parametrize("suffix", (".nii.gz", ".nii", ".nrrd", ".mha"))
def test_nan_voxels(tmp_path: Path, suffix: str) -> None:
    # ITK's NIfTI reader turns NaN into 0, so this also checks the file is read independently.
    ct = _oblique_ct()
    hu = ct.hu.copy()
    hu[0, 0, 0] = hu[1, 2, 3] = np.nan
    path = tmp_path / f"nan{suffix}"
    save_ct(CTVolume(hu=hu, affine_ras=ct.affine_ras), path)
    _raises_naming(path, "contains 2 NaN voxels")


@pytest.mark.parametrize("suffix", (".nii.gz", ".mha"))
def test_infinite_voxels(tmp_path: Path, suffix: str) -> None:
    ct = _oblique_ct()
    hu = ct.hu.copy()
    hu[0, 0, 0] = np.inf
    path = tmp_path / f"inf{suffix}"
    save_ct(CTVolume(hu=hu, affine_ras=ct.affine_ras), path)
    _raises_naming(path, "contains 1 infinite voxels")


def test_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii"
    sitk.WriteImage(sitk.Image(5, 4, sitk.sitkFloat32), str(path))
    _raises_naming(path, "3D")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "ct.png"
    path.write_bytes(b"\x89PNG")
    _raises_naming(path, "unsupported")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    _raises_naming(tmp_path, "no DICOM series")


# ---------------------------------------------------------------- a real CT


def test_real_ct_geometry_matches_nibabel() -> None:
    path = REAL_CT_DIR / "example_ct.nii.gz"
    if not path.exists():
        pytest.skip(f"real CT fixture not present at {path}")
    nibabel = pytest.importorskip("nibabel")
    ct = load_ct(path)
    assert ct.shape == (122, 101, 112)
    np.testing.assert_allclose(ct.spacing_mm, [3.0, 3.0, 3.0], atol=1e-5)
    np.testing.assert_allclose(ct.affine_ras, nibabel.load(path).affine, atol=1e-4)
    assert np.isfinite(ct.hu).all() and ct.hu.max() > 2500  # the metal implant


def test_real_ct_left_hip_is_on_patient_left() -> None:
    if not all((REAL_CT_DIR / f"hip_{side}.nii.gz").exists() for side in ("left", "right")):
        pytest.skip(f"real CT hip masks not present in {REAL_CT_DIR}")
    centroids_world = {}
    for side in ("left", "right"):
        mask = load_ct(REAL_CT_DIR / f"hip_{side}.nii.gz")
        index = np.argwhere(mask.hu > 0.5).mean(axis=0)
        centroids_world[side] = mask.affine_world[:3, :3] @ index + mask.affine_world[:3, 3]
    # RAS: x grows towards the patient's right, so the left hip has the smaller x.
    assert centroids_world["left"][0] < centroids_world["right"][0] - 50.0

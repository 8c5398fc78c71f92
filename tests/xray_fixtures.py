"""X-ray files written from store images (DICOM, PNG, TIFF, NIfTI) and the pelmark predict call, for tests/infer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from pelmark.cli import app
from pelmark.geometry import Camera
from pelmark.store import open_store

# 48² store images of 4 mm resized to 24² (an integer factor: area averaging), encoder stride 8.
SIZE = 24
# Integer levels the store images are quantised to, so that 16-bit PNG and DICOM files hold them exactly.
LEVELS = 2000


def store_image(store: Path, row: int) -> np.ndarray:
    return np.asarray(open_store(store)["images"][row], dtype=np.float64)


def store_camera(store: Path) -> Camera:
    return Camera.from_dict(dict(open_store(store).attrs)["intrinsics"])


def write_png(path: Path, pixels: np.ndarray) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(pixels).astype(np.uint16)), str(path))
    return path


def write_tiff(path: Path, pixels: np.ndarray) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(pixels, dtype=np.float32)), str(path))
    return path


def write_nifti(path: Path, pixels: np.ndarray, spacing_mm: float) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(pixels, dtype=np.float32))
    image.SetSpacing((spacing_mm, spacing_mm))
    sitk.WriteImage(image, str(path))
    return path


def write_dicom(
    path: Path, pixels: np.ndarray, spacing_mm: float | None, sdd_mm: float | None, photometric: str = "MONOCHROME2", **tags
) -> Path:
    """An XA DICOM file of ``pixels`` (uint16) with the detector tags given (None leaves a tag out)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "XA"
    ds.set_pixel_data(np.asarray(pixels).astype(np.uint16), photometric_interpretation=photometric, bits_stored=16)
    if spacing_mm is not None:
        ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    if sdd_mm is not None:
        ds.DistanceSourceToDetector = sdd_mm
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def points(path: Path) -> np.ndarray:
    return np.array([[float(r["x_px"]), float(r["y_px"])] for r in read_rows(path)])


def predict_cli(*args: str) -> object:
    return CliRunner().invoke(app, ["predict", *map(str, args), "--device", "cpu", "--no-progress"])


def expected_file_px(evaluated, i: int, file_camera: Camera) -> np.ndarray:
    """eval's model-px prediction of image ``i`` mapped to the pixels of a file seen through ``file_camera``."""
    model_px = torch.from_numpy(evaluated.predicted_px[i])
    return evaluated.truth.model_camera.pixels_to(file_camera, model_px).numpy()

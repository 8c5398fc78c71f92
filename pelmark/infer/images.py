"""Reading an X-ray file: its pixels and what its header says about the detector and the intensities.

Formats
    DICOM (pydicom; one frame, grayscale), PNG, TIFF and 2D NIfTI (SimpleITK). The pixels are
    read as the file stores them: row 0 is the first row of the file, column 0 its first
    column (a NIfTI's direction matrix is not applied; ``--rot180`` turns an image the C-arm
    stored upside down).
DICOM tags used
    ``ImagerPixelSpacing`` (0018,1164), the pixel size at the detector, else ``PixelSpacing``
    (0028,0030), which some systems calibrate to the patient plane; ``DistanceSourceToDetector``
    (0018,1110) and ``DistanceSourceToPatient`` (0018,1111); the modality LUT
    (``RescaleSlope``/``RescaleIntercept``); and, for the intensity convention,
    ``PixelIntensityRelationship`` (0028,1040): ``LIN`` is a raw detector intensity (the model
    needs its log), anything else is taken as already logarithmic. Whether bone is dark in the
    values comes from ``PixelIntensityRelationshipSign`` (0028,1041; +1 = lower values where the
    beam is weaker, i.e. bone dark) or, without it, ``PhotometricInterpretation``
    (``MONOCHROME1`` = the lowest value is displayed white, so bone, shown white, has the low
    values). Every tag that was looked for and not found is listed in :attr:`XrayImage.missing_tags`.
PNG and TIFF
    Carry no detector geometry that pelmark trusts: ``--pixel-spacing`` is needed. Their values
    are taken as a line integral with bone bright (a radiograph's usual look) unless the command
    says otherwise.
NIfTI
    The pixel spacing is the header's (mm).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import numpy as np

from pelmark.deepfluoro.importer import PixelKind
from pelmark.errors import PelmarkError


class ImageFormat(str, enum.Enum):
    DICOM = "dicom"
    PNG = "png"
    TIFF = "tiff"
    NIFTI = "nifti"


@dataclasses.dataclass(frozen=True, eq=False)
class XrayImage:
    """One X-ray as read, before any conversion.

    Attributes:
        path: the file.
        format: its format.
        pixels: (H, W) float64 values (a DICOM's after its modality LUT).
        spacing_x_mm, spacing_y_mm: pixel size along columns and rows at the detector; None when the file has none.
        sdd_mm: source-to-detector distance; None when the file has none.
        sid_mm: source-to-isocentre (patient) distance; None when the file has none.
        pixel_kind: what the values are (a raw intensity needs a log); None when the file does not say.
        bone_dark: the file says bone has the low values (it is inverted for the model).
        missing_tags: header fields looked for and not found.
        notes: how the header was read, one short sentence each.
    """

    path: Path
    format: ImageFormat
    pixels: np.ndarray
    spacing_x_mm: float | None = None
    spacing_y_mm: float | None = None
    sdd_mm: float | None = None
    sid_mm: float | None = None
    pixel_kind: PixelKind | None = None
    bone_dark: bool = False
    missing_tags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


DICOM_SUFFIXES = (".dcm", ".dicom")
_SUFFIXES = {
    ".png": ImageFormat.PNG,
    ".tif": ImageFormat.TIFF,
    ".tiff": ImageFormat.TIFF,
    ".nii": ImageFormat.NIFTI,
    ".nii.gz": ImageFormat.NIFTI,
}


def image_format(path: Path) -> ImageFormat:
    """The format of ``path`` from its suffix, or from the DICOM preamble for a file without one.

    Raises:
        PelmarkError: missing, a folder, or neither a known suffix nor a DICOM file.
    """
    path = Path(path)
    if not path.exists():
        raise PelmarkError("file not found", path)
    if not path.is_file():
        raise PelmarkError("not a file", path)
    name = path.name.lower()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if name.endswith(DICOM_SUFFIXES) or _has_dicom_preamble(path):
        return ImageFormat.DICOM
    raise PelmarkError("unsupported file type (expected DICOM, PNG, TIFF or NIfTI .nii/.nii.gz)", path)


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def read_xray(path: str | Path) -> XrayImage:
    """Read one X-ray file (see the module docstring for what is read from each format).

    Raises:
        PelmarkError: the file is missing, unreadable, not one grayscale 2D image, or empty.
    """
    path = Path(path)
    kind = image_format(path)
    xray = _read_dicom(path) if kind is ImageFormat.DICOM else _read_sitk(path, kind)
    if xray.pixels.size == 0 or min(xray.pixels.shape) < 2:
        raise PelmarkError(f"image of {xray.pixels.shape[0]} x {xray.pixels.shape[1]} pixels is too small", path)
    if not np.all(np.isfinite(xray.pixels)):
        raise PelmarkError("image holds NaN or infinite values", path)
    return xray


# ---------------------------------------------------------------- DICOM


def _read_dicom(path: Path) -> XrayImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for a corrupt file
        raise PelmarkError(f"not a readable DICOM file ({_first_line(error)})", path) from None
    if "PixelData" not in ds:
        raise PelmarkError("DICOM file has no pixel data", path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise PelmarkError(f"DICOM file holds {frames} frames; pelmark predict takes one image per file", path)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise PelmarkError("DICOM image is in colour; an X-ray must be grayscale", path)
    try:
        pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - a missing decoder, a truncated pixel array, ...
        raise PelmarkError(f"cannot decode the DICOM pixel data ({_first_line(error)})", path) from None
    if pixels.ndim != 2:
        raise PelmarkError(f"DICOM pixel data has shape {pixels.shape}, not one 2D image", path)

    missing: list[str] = []
    notes: list[str] = []
    spacing = _dicom_pair(ds, "ImagerPixelSpacing", path)
    if spacing is None:
        missing.append("ImagerPixelSpacing")
        spacing = _dicom_pair(ds, "PixelSpacing", path)
        if spacing is None:
            missing.append("PixelSpacing")
        else:
            notes.append("pixel spacing from PixelSpacing (no ImagerPixelSpacing); it may be calibrated to the patient, not the detector")
    sdd = _dicom_float(ds, "DistanceSourceToDetector", path)
    if sdd is None:
        missing.append("DistanceSourceToDetector")
    sid = _dicom_float(ds, "DistanceSourceToPatient", path)
    if sid is None:
        missing.append("DistanceSourceToPatient")

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        missing.append("PhotometricInterpretation")
    relationship = str(ds.get("PixelIntensityRelationship", "")).strip().upper()
    if not relationship:
        missing.append("PixelIntensityRelationship")
    sign = ds.get("PixelIntensityRelationshipSign")
    if sign is None:
        missing.append("PixelIntensityRelationshipSign")
    if relationship == "LIN":
        pixel_kind, bone_dark = PixelKind.INTENSITY, False
        notes.append("PixelIntensityRelationship LIN: a detector intensity, log-transformed")
    else:
        pixel_kind = PixelKind.LINE_INTEGRAL
        if sign is not None:
            bone_dark = int(sign) == 1
            notes.append(f"PixelIntensityRelationshipSign {int(sign)}: bone {'dark' if bone_dark else 'bright'} in the values")
        else:
            bone_dark = photometric == "MONOCHROME1"
            if photometric:
                notes.append(f"{photometric}: bone {'dark' if bone_dark else 'bright'} in the values")
    return XrayImage(
        path=path,
        format=ImageFormat.DICOM,
        pixels=pixels,
        spacing_x_mm=None if spacing is None else spacing[1],
        spacing_y_mm=None if spacing is None else spacing[0],
        sdd_mm=sdd,
        sid_mm=sid,
        pixel_kind=pixel_kind,
        bone_dark=bone_dark,
        missing_tags=tuple(missing),
        notes=tuple(notes),
    )


def _dicom_pair(ds, keyword: str, path: Path) -> tuple[float, float] | None:
    """A (row, column) spacing in mm, or None when the tag is absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
        return None
    try:
        row, column = (float(v) for v in value)
    except (TypeError, ValueError):
        raise PelmarkError(f"DICOM {keyword} is {value!r}, not two numbers", path) from None
    if not (np.isfinite([row, column]).all() and row > 0 and column > 0):
        raise PelmarkError(f"DICOM {keyword} must be two positive numbers, got {value!r}", path)
    return row, column


def _dicom_float(ds, keyword: str, path: Path) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PelmarkError(f"DICOM {keyword} is {value!r}, not a number", path) from None
    if not (np.isfinite(number) and number > 0):
        raise PelmarkError(f"DICOM {keyword} must be positive, got {value!r}", path)
    return number


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ---------------------------------------------------------------- PNG, TIFF, NIfTI


def _read_sitk(path: Path, kind: ImageFormat) -> XrayImage:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise PelmarkError(f"not a readable {kind.name} image", path) from None
    pixels = np.asarray(sitk.GetArrayFromImage(image), dtype=np.float64)
    if image.GetNumberOfComponentsPerPixel() > 1:
        channels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]
        if not np.all(channels == channels[..., :1]):
            raise PelmarkError("colour image; save the X-ray as grayscale", path)
        pixels = channels[..., 0]
    size = tuple(int(s) for s in image.GetSize())
    pixels = np.squeeze(pixels)
    if pixels.ndim != 2:
        raise PelmarkError(f"image of size {' x '.join(map(str, size))} is not one 2D image", path)
    if kind is not ImageFormat.NIFTI:
        return XrayImage(path=path, format=kind, pixels=pixels, missing_tags=("pixel spacing",))
    # The two axes that are longer than 1, in the file's x, y, z order (GetSize is x first).
    spacing = [s for s, n in zip(image.GetSpacing(), size) if n > 1]
    return XrayImage(
        path=path,
        format=kind,
        pixels=pixels,
        spacing_x_mm=float(spacing[0]),
        spacing_y_mm=float(spacing[1]),
        missing_tags=("source-to-detector distance",),
        notes=("pixel spacing from the NIfTI header",),
    )

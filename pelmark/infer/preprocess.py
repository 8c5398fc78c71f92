"""An X-ray as the model saw its training images, and the way back to the file's pixels.

Intensities
    The model was trained on line integrals with bone bright (a DRR). A raw detector
    intensity becomes one through :func:`pelmark.deepfluoro.importer.line_integral`, the
    DeepFluoro import's ``log(I_max) - log(I)``; an image whose bone is dark is negated
    (``--invert`` flips what the file says). After the resample the image is min-max scaled
    to [0, 1] by :func:`pelmark.train.data.normalise_image`, as every training and evaluation
    image is, so any offset or positive scale of the values does not matter.
Geometry
    The training store's images were resized to the square model input, so one model pixel
    spans ``store spacing x store width / size`` mm at the detector (:class:`ModelGrid`). The
    X-ray is resampled by :func:`pelmark.train.data.resize_image` to the size that gives the
    same mm per pixel, its camera following through :meth:`Camera.resized`, then padded with
    air (0) on all sides to a multiple of the encoder's stride, the camera following through
    :meth:`Camera.cropped` with negative offsets. The file's own camera has its principal
    point at the image centre. ``--rot180`` turns the image about its centre first. The
    predicted model pixels go back to the file's pixels through
    :meth:`Camera.pixels_to` (the same rays) and the 180° turn, so no step rounds a coordinate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pelmark.deepfluoro.importer import PixelKind, line_integral
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.infer.images import XrayImage
from pelmark.train.data import normalise_image, resize_image

# A resampled side beyond this is a wrong pixel spacing, not an X-ray (768² at 0.388 mm is the paper's).
MAX_MODEL_SIDE = 4096


@dataclasses.dataclass(frozen=True)
class ModelGrid:
    """What the model expects of its input, all a run or an ONNX file needs to say for preprocessing.

    Attributes:
        landmark_names: the heatmap channels, in order.
        store_camera: the training store's detector (its SDD and SID are the fallbacks for a file without them).
        size: the side of the square model input in training.
        multiple: the input's sides must be multiples of this (2 ** encoder depth).
        segmentation_classes: a segmentation-informed model's bone classes (its outputs after the
            heatmaps are the background's and these classes' logits); () for a heatmap model.
    """

    landmark_names: tuple[str, ...]
    store_camera: Camera
    size: int
    multiple: int
    segmentation_classes: tuple[str, ...] = ()

    @property
    def model_camera(self) -> Camera:
        """The camera of a training image at model size."""
        return self.store_camera.resized(self.size, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "landmark_names": list(self.landmark_names),
            "store_camera": self.store_camera.to_dict(),
            "size": self.size,
            "multiple": self.multiple,
            "segmentation_classes": list(self.segmentation_classes),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelGrid":
        return cls(
            landmark_names=tuple(values["landmark_names"]),
            store_camera=Camera.from_dict(values["store_camera"]),
            size=int(values["size"]),
            multiple=int(values["multiple"]),
            segmentation_classes=tuple(values.get("segmentation_classes", ())),  # absent in files before seg-informed
        )


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """What the command line says about the files, over what their headers say.

    Attributes:
        pixel_spacing_mm: detector pixel size (both axes); None = the file's.
        sdd_mm: source-to-detector distance; None = the file's, else the training store's.
        pixels: what the values are; None = what the file says (line integral when it says nothing).
        invert: flip the bone polarity the file implies.
        rot180: turn the image 180° before the model (a C-arm that stores it upside down).
    """

    pixel_spacing_mm: float | None = None
    sdd_mm: float | None = None
    pixels: PixelKind | None = None
    invert: bool = False
    rot180: bool = False

    def __post_init__(self) -> None:
        for name in ("pixel_spacing_mm", "sdd_mm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise PelmarkError(f"--{name.removesuffix('_mm').replace('_', '-')} must be a positive number of mm, got {value}")


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """One X-ray made into a model input.

    Attributes:
        image: (1, H, W) float32 model input in [0, 1].
        model_camera: camera of ``image`` (padding included).
        oriented_camera: camera of the file's image at its own resolution, after ``rot180``.
        file_camera: camera of the file's image as stored.
        rot180: whether the image was turned.
        line_integral: (H0, W0) the file's image as a line integral, bone bright, before the turn.
        sources: where the spacing, SDD, SID and intensity convention came from.
    """

    image: Tensor
    model_camera: Camera
    oriented_camera: Camera
    file_camera: Camera
    rot180: bool
    line_integral: np.ndarray
    sources: dict[str, str]

    def to_file_px(self, model_px: Tensor) -> Tensor:
        """(..., 2) model-input pixels to the file's pixels (x = column, y = row)."""
        return self.from_oriented_px(self.model_camera.pixels_to(self.oriented_camera, model_px.to(torch.float64)))

    def from_oriented_px(self, oriented_px: Tensor) -> Tensor:
        """Pixels of the turned image (``rot180``) to the file's; the identity without the turn."""
        if not self.rot180:
            return oriented_px
        size = torch.tensor([self.file_camera.width - 1, self.file_camera.height - 1], dtype=oriented_px.dtype)
        return size - oriented_px


def rotated_180(camera: Camera) -> Camera:
    """The camera of the image turned 180° about its centre (the principal point turns with it)."""
    return dataclasses.replace(camera, cx_px=camera.width - 1 - camera.cx_px, cy_px=camera.height - 1 - camera.cy_px)


def file_camera(xray: XrayImage, grid: ModelGrid, settings: ReadSettings) -> tuple[Camera, dict[str, str]]:
    """The file's camera (principal point at the centre) and where each of its values came from.

    Raises:
        PelmarkError: neither the file nor ``--pixel-spacing`` gives the pixel size.
    """
    sources: dict[str, str] = {}
    if settings.pixel_spacing_mm is not None:
        spacing_x = spacing_y = settings.pixel_spacing_mm
        sources["pixel_spacing"] = "--pixel-spacing"
    elif xray.spacing_x_mm is not None and xray.spacing_y_mm is not None:
        spacing_x, spacing_y = xray.spacing_x_mm, xray.spacing_y_mm
        sources["pixel_spacing"] = "file"
    else:
        missing = ", ".join(xray.missing_tags) or "pixel spacing"
        raise PelmarkError(f"the file gives no pixel spacing (missing: {missing}); pass --pixel-spacing MM", xray.path)
    if settings.sdd_mm is not None:
        sdd, sources["sdd"] = settings.sdd_mm, "--sdd"
    elif xray.sdd_mm is not None:
        sdd, sources["sdd"] = xray.sdd_mm, "file"
    else:
        sdd, sources["sdd"] = grid.store_camera.sdd_mm, "training store (the file has none; pass --sdd)"
    if xray.sid_mm is not None and xray.sid_mm < sdd:
        sid, sources["sid"] = xray.sid_mm, "file"
    else:
        sid, sources["sid"] = grid.store_camera.sid_mm, "training store"
    camera = Camera.centered(xray.height, xray.width, sdd_mm=sdd, spacing_mm=spacing_x, sid_mm=sid, spacing_y_mm=spacing_y)
    return camera, sources


def to_line_integral(xray: XrayImage, settings: ReadSettings) -> tuple[np.ndarray, dict[str, str]]:
    """The file's values as a line integral with bone bright, and how they were converted."""
    kind = settings.pixels or xray.pixel_kind or PixelKind.LINE_INTEGRAL
    try:
        values = line_integral(xray.pixels, kind)
    except PelmarkError as error:
        raise PelmarkError(error.message, xray.path) from None
    # A raw intensity is bone bright once logged; otherwise the file's polarity decides.
    bone_dark = xray.bone_dark and kind is not PixelKind.INTENSITY
    inverted = bone_dark != settings.invert
    sources = {
        "pixels": f"{kind.value} ({'--pixels' if settings.pixels else 'file' if xray.pixel_kind else 'default'})",
        "inverted": f"{inverted} ({'file' if bone_dark else 'no'}{' and --invert' if settings.invert else ''})",
    }
    return (-values if inverted else values), sources


def model_side(pixels: int, spacing_mm: float, model_spacing_mm: float, path) -> int:
    """Pixels along one side after resampling to ``model_spacing_mm``."""
    side = max(1, round(pixels * spacing_mm / model_spacing_mm))
    if side > MAX_MODEL_SIDE:
        raise PelmarkError(
            f"{pixels} pixels of {spacing_mm:g} mm are {side} model pixels of {model_spacing_mm:g} mm; is the pixel spacing right?",
            path,
        )
    return side


def prepare(xray: XrayImage, grid: ModelGrid, settings: ReadSettings) -> Prepared:
    """The model input of one X-ray, with the cameras that map its predictions back (see the module docstring).

    Raises:
        PelmarkError: no pixel spacing, a raw intensity with no positive value, or an absurd size.
    """
    camera, sources = file_camera(xray, grid, settings)
    values, intensity_sources = to_line_integral(xray, settings)
    sources.update(intensity_sources)
    image = torch.from_numpy(values.astype(np.float32))
    oriented = camera
    if settings.rot180:
        image, oriented = image.flip(0, 1), rotated_180(camera)
    target = grid.model_camera
    height = model_side(xray.height, oriented.spacing_y_mm, target.spacing_y_mm, xray.path)
    width = model_side(xray.width, oriented.spacing_x_mm, target.spacing_x_mm, xray.path)
    resized = normalise_image(resize_image(image, height, width))
    padded_h = math.ceil(height / grid.multiple) * grid.multiple
    padded_w = math.ceil(width / grid.multiple) * grid.multiple
    top, left = (padded_h - height) // 2, (padded_w - width) // 2
    model_input = F.pad(resized, (left, padded_w - width - left, top, padded_h - height - top), value=0.0)
    model_camera = oriented.resized(height, width).cropped(-top, -left, padded_h, padded_w)
    return Prepared(
        image=model_input[None].to(torch.float32).contiguous(),
        model_camera=model_camera,
        oriented_camera=oriented,
        file_camera=camera,
        rot180=settings.rot180,
        line_integral=values,
        sources=sources,
    )

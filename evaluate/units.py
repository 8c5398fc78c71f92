"""Landmark errors in the four units evaluation reports.

model px
    Pixels of the model input (``size`` x ``size``, 512 in the paper): the
    unit of the paper's Table 1.
detector px
    Pixels of the store's detector (768 in the paper). A point moves between
    the two with :meth:`Camera.pixels_to` (same rays), so a 1 px error at
    model size S is ``W / S`` detector px for a detector W px wide.
detector mm
    Detector px times the detector pixel spacing (``spacing_x_mm`` along
    columns, ``spacing_y_mm`` along rows).
isocentre mm
    Detector mm divided by the magnification ``sdd / sid``: the size of the
    error for an object at the isocentre, i.e. in the patient.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from pelmark.geometry import Camera


class Unit(str, enum.Enum):
    """A unit of landmark error; the value names the CSV column suffix and the table file."""

    MODEL_PX = "model_px"
    DETECTOR_PX = "detector_px"
    DETECTOR_MM = "detector_mm"
    ISOCENTRE_MM = "isocentre_mm"

    @property
    def label(self) -> str:
        return {
            Unit.MODEL_PX: "px (model)",
            Unit.DETECTOR_PX: "px (detector)",
            Unit.DETECTOR_MM: "mm (detector)",
            Unit.ISOCENTRE_MM: "mm (isocentre)",
        }[self]


def model_to_detector_px(points_model_px: np.ndarray, model_camera: Camera, store_camera: Camera) -> np.ndarray:
    """(..., 2) model pixels as store detector pixels (float64)."""
    points = torch.as_tensor(np.asarray(points_model_px, dtype=np.float64))
    return model_camera.pixels_to(store_camera, points).numpy()


def to_unit(points_model_px: np.ndarray, unit: Unit, model_camera: Camera, store_camera: Camera) -> np.ndarray:
    """(..., 2) model-px points as coordinates in ``unit``, so that distances come out in that unit.

    Detector mm are detector px times the pixel spacing of each axis; isocentre
    mm are detector mm over the magnification.
    """
    if unit is Unit.MODEL_PX:
        return np.asarray(points_model_px, dtype=np.float64)
    detector = model_to_detector_px(points_model_px, model_camera, store_camera)
    if unit is Unit.DETECTOR_PX:
        return detector
    detector_mm = detector * np.array([store_camera.spacing_x_mm, store_camera.spacing_y_mm])
    if unit is Unit.DETECTOR_MM:
        return detector_mm
    return detector_mm / store_camera.magnification


def point_errors(
    predicted_model_px: np.ndarray,
    true_model_px: np.ndarray,
    model_camera: Camera,
    store_camera: Camera,
) -> dict[Unit, np.ndarray]:
    """Euclidean distance between predicted and true points in every :class:`Unit`.

    Args:
        predicted_model_px, true_model_px: (..., 2) points in model pixels.
        model_camera: the camera of the model input.
        store_camera: the store's detector.

    Returns:
        One (...) float64 array per unit.
    """
    return {
        unit: np.linalg.norm(
            to_unit(predicted_model_px, unit, model_camera, store_camera)
            - to_unit(true_model_px, unit, model_camera, store_camera),
            axis=-1,
        )
        for unit in Unit
    }

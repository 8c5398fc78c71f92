"""Per-subject shape parameters of a phantom pelvis, and how they are drawn.

All randomness of a phantom subject's anatomy is here; :mod:`.anatomy` turns a
:class:`PelvisShape` into geometry deterministically.
"""

from __future__ import annotations

import dataclasses
from enum import Enum

import numpy as np


class Side(str, Enum):
    """The patient's side; ``sign`` is the direction of that side along RAS x."""

    LEFT = "l"
    RIGHT = "r"

    @property
    def sign(self) -> float:
        return 1.0 if self is Side.RIGHT else -1.0


@dataclasses.dataclass(frozen=True)
class ForamenShape:
    """The obturator foramen of one side: an ellipse in the plane of the foramen.

    Attributes:
        semi_major_mm: semi-axis along the foramen's long (roughly vertical) axis.
        semi_minor_mm: the other semi-axis.
        angle_deg: rotation of the long axis in its plane from the plane's
            vertical; positive tilts its upper end laterally.
    """

    semi_major_mm: float
    semi_minor_mm: float
    angle_deg: float


@dataclasses.dataclass(frozen=True)
class PelvisShape:
    """Everything that varies between phantom subjects.

    Attributes:
        scale: overall size; 1 is the reference adult.
        width: extra left-right factor on the whole skeleton.
        asymmetry: the right hemipelvis is widened by ``1 + asymmetry``, the left by ``1 - asymmetry``.
        wing_flare_deg: extra outward flare of the iliac wings, (left, right).
        tilt_deg: rotation of the skeleton in the scanner about RAS x, y, z (applied in that order).
        shift_mm: offset of the skeleton from the body's axis, RAS mm.
        foramen: obturator foramina, (left, right).
        soft_tissue_mm: soft tissue lateral of the greater trochanters.
        body_depth_ratio: antero-posterior over left-right half axis of the body's cross-section.
        fat_mm: thickness of the subcutaneous fat layer.
        cortical_hu: HU of cortical bone.
        cancellous_hu: HU of cancellous bone.
        noise_hu: standard deviation of the Gaussian noise.
    """

    scale: float
    width: float
    asymmetry: float
    wing_flare_deg: tuple[float, float]
    tilt_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    foramen: tuple[ForamenShape, ForamenShape]
    soft_tissue_mm: float
    body_depth_ratio: float
    fat_mm: float
    cortical_hu: float
    cancellous_hu: float
    noise_hu: float

    def foramen_of(self, side: Side) -> ForamenShape:
        return self.foramen[0 if side is Side.LEFT else 1]

    def flare_of(self, side: Side) -> float:
        return self.wing_flare_deg[0 if side is Side.LEFT else 1]


REFERENCE_SHAPE = PelvisShape(
    scale=1.0,
    width=1.0,
    asymmetry=0.0,
    wing_flare_deg=(0.0, 0.0),
    tilt_deg=(0.0, 0.0, 0.0),
    shift_mm=(0.0, 0.0, 0.0),
    foramen=(ForamenShape(24.0, 15.0, 10.0), ForamenShape(24.0, 15.0, 10.0)),
    soft_tissue_mm=30.0,
    body_depth_ratio=0.72,
    fat_mm=20.0,
    cortical_hu=1500.0,
    cancellous_hu=300.0,
    noise_hu=20.0,
)
"""The mean subject, undisturbed: handy for tests and pictures."""


def _foramen(generator: np.random.Generator) -> ForamenShape:
    return ForamenShape(
        semi_major_mm=float(generator.uniform(21.0, 27.0)),
        semi_minor_mm=float(generator.uniform(12.5, 17.5)),
        angle_deg=float(generator.uniform(-5.0, 25.0)),
    )


def sample_shape(generator: np.random.Generator) -> PelvisShape:
    """Draw one subject's shape. The draws happen in a fixed order, so a seeded
    generator always gives the same shape."""
    g = generator
    return PelvisShape(
        scale=float(g.uniform(0.9, 1.1)),
        width=float(g.uniform(0.94, 1.08)),
        asymmetry=float(g.uniform(-0.03, 0.03)),
        wing_flare_deg=(float(g.uniform(-5.0, 5.0)), float(g.uniform(-5.0, 5.0))),
        tilt_deg=tuple(float(v) for v in g.uniform(-4.0, 4.0, size=3)),
        shift_mm=tuple(float(v) for v in g.uniform(-6.0, 6.0, size=3)),
        foramen=(_foramen(g), _foramen(g)),
        soft_tissue_mm=float(g.uniform(15.0, 45.0)),
        body_depth_ratio=float(g.uniform(0.66, 0.8)),
        fat_mm=float(g.uniform(8.0, 35.0)),
        cortical_hu=float(g.uniform(1300.0, 1750.0)),
        cancellous_hu=float(g.uniform(200.0, 380.0)),
        noise_hu=float(g.uniform(15.0, 25.0)),
    )

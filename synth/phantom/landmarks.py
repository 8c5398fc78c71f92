"""The paper's eight landmarks, read exactly off a phantom's geometry.

Each landmark follows its anatomical definition (see
:mod:`pelmark.landmark_sets`), applied in the anatomy frame, where "inferior"
is -z and "medial" is towards x = 0:

ASIS
    The most anterior point of the anterior superior iliac spine: on the
    sphere that rounds the spine's end, so it lies on the bone surface.
IOF
    The lowest point of the obturator foramen's rim ellipse.
MOF
    The rim point closest to the midline.
SPS, IPS
    The upper and lower ends of the pubic symphysis, in the midline, between
    the two pubic bodies' joint faces.

The rim ellipse is the exact wall of the hole cut through the bony ring, so
IOF and MOF lie on the boundary between bone and the empty foramen.
"""

from __future__ import annotations

import numpy as np

from pelmark.landmark_sets import PAPER_LANDMARKS
from pelmark.synth.phantom.anatomy import Anatomy
from pelmark.synth.phantom.shape import Side

_DOWN = np.array([0.0, 0.0, -1.0])


def _sided(name: str) -> tuple[str, Side | None]:
    if name.endswith("-l"):
        return name[:-2], Side.LEFT
    if name.endswith("-r"):
        return name[:-2], Side.RIGHT
    return name, None


def landmark(anatomy: Anatomy, name: str) -> np.ndarray:
    """One landmark (3,) in the anatomy frame, by name (e.g. ``"IOF-l"``, ``"SPS"``)."""
    kind, side = _sided(name)
    if kind == "ASIS" and side is not None:
        return anatomy.spine(side).tip
    if kind == "IOF" and side is not None:
        return anatomy.foramen(side).extreme(_DOWN)
    if kind == "MOF" and side is not None:
        return anatomy.foramen(side).extreme(np.array([-side.sign, 0.0, 0.0]))
    if kind == "SPS" and side is None:
        return anatomy.symphysis.superior.copy()
    if kind == "IPS" and side is None:
        return anatomy.symphysis.inferior.copy()
    raise ValueError(f"the phantom does not define landmark {name!r}")


def landmarks_anatomy(anatomy: Anatomy, names: tuple[str, ...] = PAPER_LANDMARKS) -> np.ndarray:
    """Landmarks (L, 3) in the anatomy frame, in the order of ``names``."""
    return np.stack([landmark(anatomy, n) for n in names])


def landmarks_ras(anatomy: Anatomy, names: tuple[str, ...] = PAPER_LANDMARKS) -> np.ndarray:
    """Landmarks (L, 3) in scanner RAS mm, in the order of ``names``."""
    return anatomy.to_ras(landmarks_anatomy(anatomy, names))

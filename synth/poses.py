"""Per-subject view sampling and split assignment, seeded so any worker order gives the same data."""

from __future__ import annotations

import numpy as np

from pelmark.geometry import sample_poses
from pelmark.manifest import Role
from pelmark.seeding import numpy_generator
from pelmark.store.schema import Split


def subject_poses(
    seed: int, subject_id: str, views: int, rotation_range_deg: float, translation_range_mm: float, view: str = "ap"
) -> np.ndarray:
    """The (views, 6) poses θ of one subject around the nominal ``view``, fixed by the root seed and the subject's id."""
    generator = numpy_generator(seed, "poses", subject_id)
    return sample_poses(views, rotation_range_deg, translation_range_mm, generator, view)


def subject_splits(seed: int, subject_id: str, role: Role, views: int, novel_views: int) -> np.ndarray:
    """Split codes (views,) uint8: a random ``novel_views`` of a train subject's views are held out."""
    if role is Role.NOVEL_SUBJECT:
        return np.full(views, Split.NOVEL_SUBJECT, dtype=np.uint8)
    codes = np.full(views, Split.TRAIN, dtype=np.uint8)
    held_out = numpy_generator(seed, "novel_views", subject_id).choice(views, size=novel_views, replace=False)
    codes[held_out] = Split.NOVEL_VIEW
    return codes

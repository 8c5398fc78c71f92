"""The store's schema: its format mark, its arrays, its split codes and the conventions it declares.

A store is a Zarr v3 group. Subject ``s`` owns rows ``[s * views, (s + 1) * views)``
of every per-image array, and every chunk belongs to exactly one subject, so
tasks on different machines write disjoint chunks with no coordination.
"""

from __future__ import annotations

import dataclasses
from enum import IntEnum

FORMAT_NAME = "pelmark-synth-store"
FORMAT_VERSION = 1

# Declared in every store's attributes (intrinsics.pixel_convention, pose_convention, world_frame);
# pelmark.geometry is where they are implemented.
PIXEL_CONVENTION = "x = column, y = row; the centre of pixel (row r, column c) is (x=c, y=r); row 0 superior"
POSE_CONVENTION = (
    "theta = (r, t): r Rodrigues vector (rad), t mm, in the world frame (RAS mm, origin at the CT volume "
    "centre); the patient moves p' = R(r) p + t in front of a fixed AP C-arm (pelmark.geometry); "
    "theta = 0 is the nominal AP view"
)
WORLD_FRAME = "RAS mm, origin at the CT volume centre affine @ ((shape - 1) / 2)"

IMAGE_NORMALISATION = (
    "line integral of the linear attenuation relative to water along each ray, in mm of water "
    "(mu = max(0, 1 + HU/1000)); 0 means no attenuation. Training scales each image by its own "
    "statistics; see pelmark.train."
)
"""The ``image_normalisation`` of a rendered store (an imported one states its own)."""

# The per-image arrays a writer fills for each subject besides its images (and segmentation).
SUBJECT_ARRAYS = ("pose", "landmarks_2d", "visible", "landmarks_3d", "subject", "split")


class Split(IntEnum):
    """Codes of the store's ``split`` array (also listed in its ``splits`` attribute).

    A row whose code is none of these (an import's padding rows) belongs to no split.
    """

    TRAIN = 0
    NOVEL_VIEW = 1
    NOVEL_SUBJECT = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def splits_attribute() -> dict[str, int]:
    """The ``splits`` attribute: each split's label and code."""
    return {s.label: int(s) for s in Split}


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Shapes that every writer and reader of a store agrees on."""

    n_subjects: int
    views: int
    height: int
    width: int
    n_landmarks: int
    image_dtype: str
    segmentation: bool = False  # a `segmentation` label map per image (the cohort has bone labels)

    @property
    def n_images(self) -> int:
        return self.n_subjects * self.views

    def rows(self, subject_index: int) -> slice:
        return slice(subject_index * self.views, (subject_index + 1) * self.views)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
        """Every array of the store: name -> (shape, dtype, chunks). One image or one subject per chunk."""
        n, v, l = self.n_images, self.views, self.n_landmarks
        image = (self.height, self.width)
        arrays = {
            "images": ((n, *image), self.image_dtype, (1, *image)),
            "pose": ((n, 6), "float64", (v, 6)),
            "landmarks_2d": ((n, l, 2), "float32", (v, l, 2)),
            "visible": ((n, l), "bool", (v, l)),
            "landmarks_3d": ((n, l, 3), "float32", (v, l, 3)),
            "subject": ((n,), "int32", (v,)),
            "split": ((n,), "uint8", (v,)),
            "subject_done": ((self.n_subjects,), "bool", (1,)),
        }
        if self.segmentation:
            arrays["segmentation"] = ((n, *image), "uint8", (1, *image))
        return arrays

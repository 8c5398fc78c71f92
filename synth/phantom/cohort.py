"""A cohort of phantom subjects on disk: CTs, landmark files, a manifest and a preview.

Layout of ``out``::

    manifest.toml          [dataset] name = "phantom", the paper's landmarks, the subjects
    ct/s000.nii.gz         HU, float32, LPS identity direction
    seg/s000.nii.gz        bone labels on the CT's grid, uint8 (classes: SEED003_CLASSES)
    landmarks/s000.mrk.json
    phantom.json           the settings and each subject's shape parameters
    preview.png            AP DRRs with the landmarks (unless preview=False)

Subject ``i`` is drawn from seeds derived from ``(seed, "phantom", ..., i)``
alone, so it is the same whatever the cohort size, and the same seed gives the
same files, bit for bit. The last ``n_novel_subjects`` subjects are held out
as ``novel_subject``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume, save_ct
from pelmark.io.atomic import write_text_atomic
from pelmark.io.landmarks import write_mrk_json
from pelmark.io.labels import save_labels
from pelmark.landmark_sets import PAPER_LANDMARKS, SEED003_CLASSES
from pelmark.manifest import Role, Subject, write_manifest
from pelmark.seeding import numpy_generator
from pelmark.synth.phantom.anatomy import Anatomy, build_anatomy
from pelmark.synth.phantom.landmarks import landmarks_ras
from pelmark.synth.phantom.shape import PelvisShape, sample_shape
from pelmark.synth.phantom.voxelise import voxelise_labelled

DATASET_NAME = "phantom"


@dataclasses.dataclass(frozen=True)
class CohortSettings:
    """What :func:`write_cohort` writes.

    Attributes:
        n_subjects: number of phantom subjects.
        seed: root seed of every random draw.
        spacing_mm: isotropic voxel size of the CTs.
        n_novel_subjects: subjects held out as ``novel_subject`` (the last ones);
            None means about one in five, and at least one when there are two or more subjects.
        beads: also put a dense bead (``bead_radius_vox``, 3000 HU) at every landmark.
        preview: write ``preview.png``.
        bead_radius_vox: bead radius in voxels.
        synth: an optional ``[synth]`` table for the manifest.
        train: an optional ``[train]`` table for the manifest.
    """

    n_subjects: int = 6
    seed: int = 0
    spacing_mm: float = 2.0
    n_novel_subjects: int | None = None
    beads: bool = False
    preview: bool = True
    bead_radius_vox: float = 1.5
    synth: Mapping[str, Any] | None = None
    train: Mapping[str, Any] | None = None

    def novel_count(self) -> int:
        if self.n_novel_subjects is not None:
            return self.n_novel_subjects
        if self.n_subjects < 2:
            return 0
        return max(1, round(self.n_subjects / 5))

    def check(self, out: Path) -> None:
        """Raise a one-line :class:`PelmarkError` for settings that cannot make a cohort."""
        if self.n_subjects < 1:
            raise PelmarkError(f"need at least one subject, got {self.n_subjects}", out)
        if not self.spacing_mm > 0.0:
            raise PelmarkError(f"voxel spacing must be positive, got {self.spacing_mm} mm", out)
        novel = self.novel_count()
        if not 0 <= novel < self.n_subjects:
            raise PelmarkError(
                f"{novel} novel subjects out of {self.n_subjects} leaves no training subject", out
            )
        if self.bead_radius_vox <= 0.0:
            raise PelmarkError(f"bead radius must be positive, got {self.bead_radius_vox} voxels", out)


def subject_id(index: int) -> str:
    return f"s{index:03d}"


@dataclasses.dataclass(frozen=True, eq=False)
class PhantomSubject:
    """One generated subject, in memory.

    Attributes:
        id: ``sNNN``.
        shape: its drawn shape parameters.
        anatomy: its skeleton.
        ct: its CT.
        labels: (I, J, K) uint8 bone labels on the CT's grid (value k + 1 = ``SEED003_CLASSES[k]``).
        landmarks_ras: (L, 3) landmarks in the CT's scanner RAS, ordered as ``PAPER_LANDMARKS``.
    """

    id: str
    shape: PelvisShape
    anatomy: Anatomy
    ct: CTVolume
    labels: np.ndarray
    landmarks_ras: np.ndarray


def make_subject(settings: CohortSettings, index: int) -> PhantomSubject:
    """Subject ``index`` of the cohort; it depends on the seed and the index only."""
    shape = sample_shape(numpy_generator(settings.seed, "phantom", "shape", index))
    anatomy = build_anatomy(shape)
    points_ras = landmarks_ras(anatomy, PAPER_LANDMARKS)
    ct, labels = voxelise_labelled(
        anatomy,
        shape,
        settings.spacing_mm,
        numpy_generator(settings.seed, "phantom", "noise", index),
        beads_ras=points_ras if settings.beads else None,
        bead_radius_vox=settings.bead_radius_vox,
    )
    return PhantomSubject(subject_id(index), shape, anatomy, ct, labels, points_ras)


def write_cohort(out: Path, settings: CohortSettings) -> Path:
    """Write a phantom cohort into ``out`` (created if needed) and return the manifest's path."""
    out = Path(out)
    settings.check(out)
    try:
        (out / "ct").mkdir(parents=True, exist_ok=True)
        (out / "landmarks").mkdir(parents=True, exist_ok=True)
        (out / "seg").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PelmarkError(f"cannot create the cohort folder ({exc.strerror})", out) from None

    n_train = settings.n_subjects - settings.novel_count()
    subjects, shapes, panels = [], {}, []
    for index in range(settings.n_subjects):
        subject = make_subject(settings, index)
        sid, ct = subject.id, subject.ct
        role = Role.TRAIN if index < n_train else Role.NOVEL_SUBJECT
        ct_path, landmarks_path = out / "ct" / f"{sid}.nii.gz", out / "landmarks" / f"{sid}.mrk.json"
        seg_path = out / "seg" / f"{sid}.nii.gz"
        save_ct(ct, ct_path)
        save_labels(subject.labels, ct.affine_ras, seg_path)
        write_mrk_json(landmarks_path, PAPER_LANDMARKS, subject.landmarks_ras)
        subjects.append(Subject(id=sid, ct=ct_path, landmarks=landmarks_path, role=role, segmentation=seg_path))
        shapes[sid] = dataclasses.asdict(subject.shape)
        if settings.preview:
            from pelmark.synth.phantom.preview import preview_camera, render_panel

            landmarks_world = ct.ras_to_world(subject.landmarks_ras)
            panels.append(render_panel(f"{sid} ({role.value})", ct, landmarks_world, preview_camera(ct)))

    manifest = out / "manifest.toml"
    write_manifest(
        manifest, DATASET_NAME, PAPER_LANDMARKS, subjects, synth=settings.synth, train=settings.train, classes=SEED003_CLASSES
    )
    record = {"settings": _jsonable(dataclasses.asdict(settings)), "subjects": shapes}
    write_text_atomic(out / "phantom.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    if settings.preview:
        from pelmark.synth.phantom.preview import write_montage

        write_montage(out / "preview.png", panels, PAPER_LANDMARKS)
    return manifest


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value

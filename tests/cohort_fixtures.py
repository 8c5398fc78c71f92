"""A tiny bead cohort for synth tests: small CTs whose landmarks are dense beads, optionally with two labelled bones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pelmark.io.ct import CTVolume, save_ct
from pelmark.io.labels import save_labels
from pelmark.io.landmarks import write_mrk_json
from pelmark.manifest import Role, Subject, write_manifest

NAMES = ("A", "B", "C", "D", "E")
BONE_CLASSES = ("hemipelvis-l", "hemipelvis-r")
# Two bone blocks of the bead CT's (40, 36, 32) grid, as index ranges [lo, hi) per axis: label 1, then 2.
BONE_BLOCKS = (((6, 16), (12, 24), (10, 22)), ((24, 34), (12, 24), (10, 22)))
BONE_HU = 700.0


def bead_ct(seed: int, shape=(40, 36, 32), spacing=3.0) -> tuple[CTVolume, np.ndarray]:
    """A water ellipsoid in air with 5 bright beads; returns the CT and the beads' scanner RAS positions."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    centre = (np.asarray(shape) - 1) / 2
    inside = sum(((grid[a] - centre[a]) / (0.45 * shape[a])) ** 2 for a in range(3)) <= 1.0
    # A faint body (-900 HU): enough to have tissue, too little to bias bead centroids.
    hu = np.where(inside, -900.0, -1000.0).astype(np.float32)
    beads = np.stack([rng.integers(8, s - 8, size=len(NAMES)) for s in shape], axis=1)
    for b in beads:
        hu[sum((grid[a] - b[a]) ** 2 for a in range(3)) <= 1.6**2] = 3000.0
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [50.0 + seed, 20.0, -100.0]
    ct = CTVolume(hu=hu, affine_ras=affine)
    return ct, beads @ affine[:3, :3].T + affine[:3, 3]


def with_bones(ct: CTVolume) -> tuple[CTVolume, np.ndarray]:
    """The CT with the two :data:`BONE_BLOCKS` at :data:`BONE_HU`, and its label volume (1 and 2 in the blocks)."""
    hu = ct.hu.copy()
    labels = np.zeros(ct.shape, dtype=np.uint8)
    for value, block in enumerate(BONE_BLOCKS, start=1):
        index = tuple(slice(lo, hi) for lo, hi in block)
        hu[index] = np.maximum(hu[index], BONE_HU)
        labels[index] = value
    return CTVolume(hu=hu, affine_ras=ct.affine_ras), labels


def write_bead_cohort(root: Path, n_subjects: int = 3, synth: dict | None = None, bones: bool = False) -> Path:
    """Write CTs, landmarks and a manifest (the last subject is novel_subject). Returns the manifest path.

    With ``bones``, each CT gets the two :data:`BONE_BLOCKS`, a ``seg/`` label volume and the
    manifest the classes :data:`BONE_CLASSES`.
    """
    subjects = []
    for i in range(n_subjects):
        ct, points = bead_ct(i)
        ct_path = root / "ct" / f"b{i}.nii.gz"
        lm_path = root / "landmarks" / f"b{i}.mrk.json"
        ct_path.parent.mkdir(parents=True, exist_ok=True)
        lm_path.parent.mkdir(parents=True, exist_ok=True)
        seg_path = None
        if bones:
            ct, labels = with_bones(ct)
            seg_path = root / "seg" / f"b{i}.nii.gz"
            seg_path.parent.mkdir(parents=True, exist_ok=True)
            save_labels(labels, ct.affine_ras, seg_path)
        save_ct(ct, ct_path)
        write_mrk_json(lm_path, NAMES, points)
        role = Role.NOVEL_SUBJECT if i == n_subjects - 1 else Role.TRAIN
        subjects.append(Subject(id=f"b{i}", ct=ct_path, landmarks=lm_path, role=role, segmentation=seg_path))
    settings = {"views": 4, "height": 48, "pixel_spacing": 4.0, "novel_views": 1, "rotation_range": 30.0,
                "translation_range": 20.0, "threads": 1}
    settings.update(synth or {})
    manifest = root / "manifest.toml"
    write_manifest(manifest, "beads", NAMES, subjects, synth=settings, classes=BONE_CLASSES if bones else ())
    return manifest


def write_bead_store(root: Path, bones: bool = False) -> Path:
    """``root/store.zarr``: the default bead cohort synthesised (3 subjects, the last novel_subject, 4 views of 48²)."""
    from pelmark.synth.pipeline import run_synth

    out = root / "store.zarr"
    run_synth(write_bead_cohort(root, bones=bones), out, {"scheduler": "sync"}, progress=False)
    return out


def centroid_errors(image, points_px, window: int = 3) -> list[float]:
    """Distance (px) between each isolated, on-detector point and the intensity centroid around it."""
    import torch

    image = torch.as_tensor(np.asarray(image, dtype=np.float64))
    points_px = torch.as_tensor(np.asarray(points_px, dtype=np.float64))
    errors = []
    height, width = image.shape
    for i, (u, v) in enumerate(points_px.tolist()):
        others = torch.cat([points_px[:i], points_px[i + 1 :]])
        if len(others) and (others - points_px[i]).norm(dim=-1).min() < 2 * window + 2:
            continue
        c0, r0 = round(u), round(v)
        if not (window <= c0 < width - window and window <= r0 < height - window):
            continue
        win = image[r0 - window : r0 + window + 1, c0 - window : c0 + window + 1]
        win = (win - win.min()).clamp_min(0.0)
        rows, cols = torch.meshgrid(
            torch.arange(r0 - window, r0 + window + 1, dtype=torch.float64),
            torch.arange(c0 - window, c0 + window + 1, dtype=torch.float64),
            indexing="ij",
        )
        total = win.sum()
        errors.append(float(np.hypot(((win * cols).sum() / total).item() - u, ((win * rows).sum() / total).item() - v)))
    return errors

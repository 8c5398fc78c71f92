"""``pelmark import-deepfluoro``: DeepFluoro's CTs as a manifest, its X-rays as a store.

What an import writes into ``DIR``:

``ct/<specimen>.nii.gz``, ``landmarks/<specimen>.mrk.json``, ``manifest.toml``
    Each specimen's CT (HU as stored) and its 3D landmarks in the chosen
    list, so ``pelmark synth DIR/manifest.toml`` renders DRRs of DeepFluoro's
    CTs. The manifest's ``[synth]`` table holds the real C-arm's geometry at
    the store's size (sdd, sid, detector size and pixel spacing).
``xrays.zarr``
    The real X-rays as a store in the synth schema, written by :mod:`pelmark.store`,
    which :class:`pelmark.train.data.StoreDataset` and ``pelmark eval`` read like
    a synth store. See :func:`import_deepfluoro` for what differs.
``import_report.json``
    The settings, the camera, and the conversion proof per projection.

Leave-one-specimen-out: ``holdout`` names one specimen; its manifest role is
``novel_subject`` and its X-rays have split ``novel_subject``. Every other
specimen is ``train`` with X-rays of split ``train``; without a holdout all are.

Everything is written into a temporary folder beside ``DIR`` that is renamed
to ``DIR`` at the end; on any error it is removed, so ``DIR`` is either
complete or untouched.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pelmark.deepfluoro.convert import (
    CameraConversion,
    ConvertedProjection,
    LandmarkSet,
    camera_conversion,
    convert_projection,
    landmarks_world,
)
from pelmark.deepfluoro.layout import DEEPFLUORO_CLASS_NAMES, DeepFluoroFile, SpecimenIndex
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, nominal_rotation, rotation_angle_deg, rotation_to_rotvec
from pelmark.io.atomic import publish_folder, write_text_atomic
from pelmark.store import (
    Split,
    StoreLayout,
    create_store,
    format_attributes,
    mark_finished,
    open_store,
    store_attributes,
    subject_record,
    write_subject,
)

PADDING_SPLIT = 255
"""Split code of the padding rows that even out specimens' projection counts; no reader selects it."""

STORE_NAME = "xrays.zarr"
MANIFEST_NAME = "manifest.toml"
REPORT_NAME = "import_report.json"
DATASET_NAME = "deepfluoro"

REAL_IMAGE_NORMALISATION = {
    "intensity": "minus the log of the detector intensity relative to the image's brightest pixel, "
    "log(I_max) - log(max(I, 1e-6 I_max)): a line integral up to scale, >= 0, bone bright like a DRR; "
    "training and evaluation scale each image by its own statistics",
    "line-integral": "the file's pixels as stored (declared to be line integrals)",
}


class PixelKind(str, enum.Enum):
    """What the file's projection pixels are: raw detector intensities (DeepFluoro's) or line integrals."""

    INTENSITY = "intensity"
    LINE_INTEGRAL = "line-integral"


@dataclasses.dataclass(frozen=True)
class ImportSettings:
    """How an import converts the file.

    Attributes:
        landmarks: the landmark list written (the paper's 8 or DeepFluoro's 14).
        holdout: the specimen held out as ``novel_subject`` (None: all are ``train``).
        size: side of the square store images. 768 halves DeepFluoro's 1536² detector
            exactly, which is synth's default camera (0.388 mm pixels, sdd 1020 mm).
        tolerance_px: largest conversion error allowed on any landmark of any
            projection, in the file's pixels.
        pixels: what the file's pixels are (see :class:`PixelKind`).
        sid_mm: the nominal C-arm's source-to-isocentre distance that θ = 0 means;
            None takes the median depth of the CT centres over all projections.
        overwrite: replace ``DIR`` if it holds an earlier import.
    """

    landmarks: LandmarkSet = LandmarkSet.PAPER
    holdout: str | None = None
    size: int = 768
    tolerance_px: float = 0.5
    pixels: PixelKind = PixelKind.INTENSITY
    sid_mm: float | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.size < 8:
            raise PelmarkError(f"--size must be at least 8 pixels, got {self.size}")
        if not self.tolerance_px > 0:
            raise PelmarkError(f"--tolerance-px must be positive, got {self.tolerance_px}")
        if self.sid_mm is not None and not self.sid_mm > 0:
            raise PelmarkError(f"sid_mm must be positive, got {self.sid_mm}")


@dataclasses.dataclass(frozen=True)
class ProjectionCheck:
    """The conversion proof of one projection, in the file's pixels."""

    specimen: str
    key: str
    rot_180_for_up: bool
    max_px: float
    median_px: float
    visible: int


@dataclasses.dataclass(frozen=True)
class SpecimenEntry:
    """A specimen in the output: its manifest role and its store rows ``[first_row, first_row + projections)``."""

    name: str
    role: str
    projections: int
    first_row: int


@dataclasses.dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_deepfluoro` wrote, and the conversion proof."""

    out_dir: Path
    manifest: Path
    store: Path
    report: Path
    specimens: tuple[SpecimenEntry, ...]
    checks: tuple[ProjectionCheck, ...]
    camera: Camera
    mirror_columns: bool
    tolerance_px: float
    holdout: str | None

    @property
    def max_error_px(self) -> float:
        return max(c.max_px for c in self.checks)

    @property
    def median_error_px(self) -> float:
        return float(np.median([c.median_px for c in self.checks]))

    def lines(self) -> list[str]:
        """The summary the CLI prints."""
        holdout = f"; held out: {self.holdout} (novel_subject)" if self.holdout else "; no held-out specimen"
        return [
            f"imported {len(self.specimens)} specimens, {len(self.checks)} X-rays into {self.out_dir}{holdout}",
            f"conversion check: median {self.median_error_px:.4f} px, max {self.max_error_px:.4f} px "
            f"over {len(self.checks)} projections (tolerance {self.tolerance_px:g} px)",
            f"manifest {self.manifest}, store {self.store}, report {self.report}",
        ]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything decided before the first byte is written."""

    names: tuple[str, ...]
    conversion: CameraConversion
    camera: Camera
    store_camera: Camera
    world: dict[str, np.ndarray]
    converted: dict[str, tuple[ConvertedProjection, ...]]
    checks: tuple[ProjectionCheck, ...]


# ---------------------------------------------------------------- the import


def import_deepfluoro(
    h5_path: str | Path,
    out_dir: str | Path,
    settings: ImportSettings = ImportSettings(),
    progress: bool = True,
) -> ImportSummary:
    """Import a DeepFluoro full-resolution file into ``out_dir``.

    The X-ray store follows the synth schema, with these choices:

    * images: ``size`` x ``size`` float16, turned into pelmark's orientation
      (columns mirrored when the file's camera is a mirror image, turned 180° where
      ``rot-180-for-up``) and resized like :meth:`Camera.resized`; the ``intrinsics``
      attribute is ``camera.resized(size, size)`` of the full-resolution camera.
    * rows: synth's layout, subject ``s`` owning rows ``[s * views, (s + 1) * views)``
      with ``views`` the largest projection count of a specimen. A specimen with
      fewer projections is padded with rows of split :data:`PADDING_SPLIT` (255),
      zero images and no visible landmark; its real rows come first. The
      ``subjects`` attribute gives each specimen's projection keys and row count.
    * ``landmarks_2d``: the file's ``gt-landmarks`` in pelmark pixels (a derived
      midline landmark: the projection of its 3D point); ``visible``: on the
      detector and in front of the source; ``pose``: θ of ``cam-to-pelvis-vol``.

    Args:
        h5_path: the DeepFluoro file (``ipcai_2020_full_res_data.h5``).
        out_dir: folder to create.
        settings: landmark list, holdout, size, tolerance, ...
        progress: show a progress bar.

    Raises:
        PelmarkError: the file is not in the documented layout, the holdout is
            not a specimen, a projection lacks landmarks, the conversion check
            exceeds the tolerance, or ``out_dir`` exists (without ``overwrite``).
            Nothing is left in ``out_dir`` then.
    """
    out = Path(os.path.abspath(out_dir))
    _check_output(out, settings.overwrite)
    with DeepFluoroFile(h5_path) as source:
        if settings.holdout is not None:
            source.specimen(settings.holdout)
        plan = _plan(source, settings)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            summary = _write(staging, out, source, plan, settings, progress)
            publish_folder(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return summary


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise PelmarkError("output folder already exists; use --overwrite to replace it", out)
    if not out.is_dir() or not ((out / REPORT_NAME).is_file() or not any(out.iterdir())):
        raise PelmarkError("refusing to overwrite: not an earlier DeepFluoro import (no import_report.json)", out)


def _plan(source: DeepFluoroFile, settings: ImportSettings) -> _Plan:
    """Convert every pose and landmark and run the conversion check; reads no image or CT voxels."""
    names = settings.landmarks.names
    conversion = camera_conversion(source.params, source.path)
    world = {}
    for specimen in source.specimens:
        world[specimen.name] = landmarks_world(specimen, names, source.path)
        _check_inside(specimen, world[specimen.name], names, source.path)

    if settings.sid_mm is not None:
        sid = float(settings.sid_mm)
    else:
        depths = [
            conversion.world_to_camera(r.cam_to_pelvis, s.volume.center_ras, r.rot_180_for_up)[2, 3]
            for s in source.specimens
            for r in s.projections
        ]
        sid = round(float(np.median(depths)), 1)
    if not 0.0 < sid < conversion.sdd_mm:
        raise PelmarkError(
            f"the CT centres lie {sid:.1f} mm from the source, not between it and the detector "
            f"({conversion.sdd_mm:.1f} mm): the camera frame is not the documented one",
            source.path,
        )
    camera = conversion.camera(sid)

    converted: dict[str, tuple[ConvertedProjection, ...]] = {}
    checks = []
    for specimen in source.specimens:
        items = tuple(
            convert_projection(r, specimen, conversion, camera, names, source=source.path) for r in specimen.projections
        )
        converted[specimen.name] = items
        for record, item in zip(specimen.projections, items):
            on_detector = camera.contains(_tensor(item.landmarks_px)).numpy() & (item.depth_mm > 0)
            checks.append(
                ProjectionCheck(
                    specimen=specimen.name,
                    key=record.key,
                    rot_180_for_up=record.rot_180_for_up,
                    max_px=item.max_error_px,
                    median_px=item.median_error_px,
                    visible=int(on_detector.sum()),
                )
            )
    worst = max(checks, key=lambda c: c.max_px)
    if worst.max_px > settings.tolerance_px:
        raise PelmarkError(
            f"conversion check failed: in /{worst.specimen}/projections/{worst.key} the 3D landmarks projected with "
            f"the converted pose lie up to {worst.max_px:.3f} px from gt-landmarks (tolerance {settings.tolerance_px:g} px)",
            source.path,
        )
    return _Plan(
        names=names,
        conversion=conversion,
        camera=camera,
        store_camera=camera.resized(settings.size, settings.size),
        world=world,
        converted=converted,
        checks=tuple(checks),
    )


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def _check_inside(specimen: SpecimenIndex, points_world: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    """Every landmark must lie inside its CT; an LPS/RAS mix-up would put them outside."""
    volume = specimen.volume
    affine_world = volume.affine_ras.copy()
    affine_world[:3, 3] -= volume.center_ras
    inverse = np.linalg.inv(affine_world)
    index = points_world @ inverse[:3, :3].T + inverse[:3, 3]
    upper = np.asarray(volume.shape_xyz, dtype=np.float64) - 0.5
    inside = np.all((index >= -0.5) & (index <= upper), axis=-1)
    if not inside.all():
        outside = ", ".join(n for n, ok in zip(names, inside) if not ok)
        raise PelmarkError(f"/{specimen.name}/vol-landmarks: outside the CT volume: {outside}", path)


# ---------------------------------------------------------------- writing


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _write(
    staging: Path, out: Path, source: DeepFluoroFile, plan: _Plan, settings: ImportSettings, progress: bool
) -> ImportSummary:
    """Write CTs, landmarks, manifest, store and report into ``staging``, naming the final paths inside."""
    from tqdm import tqdm

    from pelmark.io.ct import save_ct
    from pelmark.io.landmarks import write_mrk_json
    from pelmark.manifest import Role, Subject, write_manifest

    (staging / "ct").mkdir()
    (staging / "landmarks").mkdir()
    classes, lookup = _classes(source)
    if classes:
        (staging / "seg").mkdir()
    subjects, records, entries = [], [], []
    views = max(len(s.projections) for s in source.specimens)
    bar = tqdm(
        total=sum(len(s.projections) for s in source.specimens), desc="importing", unit="X-ray", leave=False, disable=not progress
    )
    try:
        for index, specimen in enumerate(source.specimens):
            bar.set_postfix_str(f"{specimen.name}: CT")
            role = Role.NOVEL_SUBJECT if specimen.name == settings.holdout else Role.TRAIN
            stem = _file_stem(specimen.name)
            ct = source.read_volume(specimen)
            ct_rel, lm_rel = Path("ct") / f"{stem}.nii.gz", Path("landmarks") / f"{stem}.mrk.json"
            save_ct(ct, staging / ct_rel)
            write_mrk_json(staging / lm_rel, plan.names, ct.world_to_ras(plan.world[specimen.name]))
            segmentation = {}
            if classes:
                from pelmark.io.labels import LabelVolume, labels_digest, save_labels

                seg_rel = Path("seg") / f"{stem}.nii.gz"
                labels = lookup[specimen.name][source.read_volume_labels(specimen)]
                save_labels(labels, ct.affine_ras, staging / seg_rel)
                segmentation = {"segmentation": str(out / seg_rel), "segmentation_sha256": labels_digest(LabelVolume(labels, ct.affine_ras))}
            subjects.append(
                Subject(
                    id=specimen.name, ct=staging / ct_rel, landmarks=staging / lm_rel, role=role,
                    segmentation=staging / seg_rel if classes else None,
                )
            )  # fmt: skip
            records.append(
                subject_record(
                    index, specimen.name, role.value, str(out / ct_rel), str(out / lm_rel), ct, plan.world[specimen.name],
                    projections=[r.key for r in specimen.projections], n_projections=len(specimen.projections),
                    **segmentation,
                )
            )  # fmt: skip
            entries.append(SpecimenEntry(specimen.name, role.value, len(specimen.projections), index * views))
            del ct

        manifest_path = staging / MANIFEST_NAME
        write_manifest(manifest_path, DATASET_NAME, plan.names, subjects, synth=_synth_table(plan), classes=classes)
        manifest_sha = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        _write_store(staging / STORE_NAME, out, source, plan, settings, records, manifest_sha, views, bar, (classes, lookup))
    finally:
        bar.close()

    summary = ImportSummary(
        out_dir=out,
        manifest=out / MANIFEST_NAME,
        store=out / STORE_NAME,
        report=out / REPORT_NAME,
        specimens=tuple(entries),
        checks=plan.checks,
        camera=plan.store_camera,
        mirror_columns=plan.conversion.mirror_columns,
        tolerance_px=settings.tolerance_px,
        holdout=settings.holdout,
    )
    report = _report(summary, source, plan, settings)
    write_text_atomic(staging / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return summary


def _synth_table(plan: _Plan) -> dict[str, Any]:
    """``[synth]`` settings that make ``pelmark synth`` render with the real C-arm's geometry."""
    camera = plan.store_camera
    table: dict[str, Any] = {"sdd": camera.sdd_mm, "sid": camera.sid_mm}
    # synth's camera is square-pixelled and centred; only then can it match the store's.
    if abs(camera.spacing_x_mm - camera.spacing_y_mm) <= 1e-9 * camera.spacing_x_mm:
        table.update(height=camera.height, width=camera.width, pixel_spacing=camera.spacing_x_mm)
    # Source under the table: the X-rays are posterior-anterior, so the DRRs must be too.
    if nominal_view(plan) == "pa":
        table["view"] = "pa"
    return table


def nominal_view(plan: _Plan) -> str:
    """``pa`` when most X-rays are nearer the PA view than the AP one, else ``ap`` (geodesic rotation angles)."""
    poses = torch.as_tensor(np.stack([item.pose for items in plan.converted.values() for item in items]))
    nominal = {view: torch.cat([rotation_to_rotvec(nominal_rotation(view)), torch.zeros(3, dtype=torch.float64)])
               for view in ("ap", "pa")}
    from_ap = rotation_angle_deg(poses, nominal["ap"].expand_as(poses))
    from_pa = rotation_angle_deg(poses, nominal["pa"].expand_as(poses))
    return "pa" if float((from_pa < from_ap).double().mean()) > 0.5 else "ap"


def _settings_attribute(plan: _Plan, settings: ImportSettings, views: int) -> dict[str, Any]:
    camera = plan.store_camera
    return {
        "source": "deepfluoro",
        "views": views,
        "height": camera.height,
        "width": camera.width,
        "pixel_spacing": camera.spacing_x_mm,
        "sdd": camera.sdd_mm,
        "sid": camera.sid_mm,
        "novel_views": 0,
        "seed": 0,
        "image_dtype": "float16",
        "landmark_set": settings.landmarks.value,
        "holdout": settings.holdout,
        "size": settings.size,
        "tolerance_px": settings.tolerance_px,
        "pixels": settings.pixels.value,
        "sid_mm_setting": settings.sid_mm,
        "mirror_columns": plan.conversion.mirror_columns,
    }


def line_integral(image: np.ndarray, kind: PixelKind) -> np.ndarray:
    """The image as a line integral (bone bright), see :data:`REAL_IMAGE_NORMALISATION`."""
    if kind is PixelKind.LINE_INTEGRAL:
        return np.asarray(image, dtype=np.float64)
    peak = float(np.max(image))
    if peak <= 0:
        raise PelmarkError("a projection has no positive intensity (use --pixels line-integral?)")
    return np.log(peak) - np.log(np.maximum(image, peak * 1e-6))


def _classes(source: DeepFluoroFile) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """The bone classes of a file with segmentations, and per specimen a lookup table from its label values to them.

    DeepFluoro's names become pelmark's (:data:`DEEPFLUORO_CLASS_NAMES`), in the order of
    ``SEED003_CLASSES``; other names follow, sorted. ((), {}) for a file without ``vol-seg`` and ``gt-seg``.
    """
    from pelmark.landmark_sets import SEED003_CLASSES

    if not source.has_segmentation():
        return (), {}
    names = {s.name: {v: DEEPFLUORO_CLASS_NAMES.get(n, n) for v, n in source.label_names(s).items()} for s in source.specimens}
    found = {n for per in names.values() for n in per.values()}
    classes = tuple(c for c in SEED003_CLASSES if c in found) + tuple(sorted(found - set(SEED003_CLASSES)))
    lookup = {}
    for specimen, per in names.items():
        table = np.zeros(256, dtype=np.uint8)  # a value without a name is background
        for value, name in per.items():
            table[value] = classes.index(name) + 1
        lookup[specimen] = table
    return classes, lookup


def _write_store(
    path: Path,
    out: Path,
    source: DeepFluoroFile,
    plan: _Plan,
    settings: ImportSettings,
    records: list[dict[str, Any]],
    manifest_sha: str,
    views: int,
    bar,
    labelled: tuple[tuple[str, ...], dict[str, np.ndarray]] = ((), {}),
) -> None:
    """The X-rays as a store; with ``labelled`` (the classes and each specimen's lookup table), each ``gt-seg`` too,
    oriented like its image and resized by nearest neighbour at pixel centres."""
    import torch

    from pelmark.train.data import resize_image

    camera, store_camera = plan.camera, plan.store_camera
    layout = StoreLayout(
        n_subjects=len(source.specimens),
        views=views,
        height=store_camera.height,
        width=store_camera.width,
        n_landmarks=len(plan.names),
        image_dtype="float16",
        segmentation=bool(labelled[0]),
    )
    data_settings = _settings_attribute(plan, settings, views)
    create_store(path, layout, format_attributes())
    group = open_store(path, mode="r+")
    digest = hashlib.sha256()
    for index, specimen in enumerate(source.specimens):
        bar.set_postfix_str(specimen.name)
        rows = layout.rows(index)
        count = len(specimen.projections)
        split = Split.NOVEL_SUBJECT if specimen.name == settings.holdout else Split.TRAIN
        data = {
            "pose": np.zeros((views, 6)),
            "landmarks_2d": np.zeros((views, len(plan.names), 2), dtype=np.float32),
            "visible": np.zeros((views, len(plan.names)), dtype=bool),
            "landmarks_3d": np.zeros((views, len(plan.names), 3), dtype=np.float32),
            "subject": np.full(views, index, dtype=np.int32),
            "split": np.full(views, PADDING_SPLIT, dtype=np.uint8),
        }
        for j, (record, item) in enumerate(zip(specimen.projections, plan.converted[specimen.name])):
            raw = source.read_image(record)
            digest.update(raw.tobytes())
            digest.update(record.cam_to_pelvis.tobytes())
            try:
                line = line_integral(raw, settings.pixels)
            except PelmarkError as err:
                raise PelmarkError(f"{record.h5_path}/image/pixels: {err.message}", source.path) from None
            image = plan.conversion.image(line, record.rot_180_for_up)
            resized = resize_image(torch.from_numpy(image), store_camera.height, store_camera.width)
            group["images"][rows.start + j] = resized.numpy().astype(np.float16)
            if labelled[0]:
                labels = labelled[1][specimen.name][source.read_projection_labels(record)]
                digest.update(labels.tobytes())
                oriented = torch.from_numpy(plan.conversion.labels(labels, record.rot_180_for_up).astype(np.float32))
                size = (store_camera.height, store_camera.width)
                group["segmentation"][rows.start + j] = (
                    torch.nn.functional.interpolate(oriented[None, None], size=size, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
                )
            px = camera.pixels_to(store_camera, _tensor(item.landmarks_px))
            data["pose"][j] = item.pose
            data["landmarks_2d"][j] = px.numpy()
            data["visible"][j] = store_camera.contains(px).numpy() & (item.depth_mm > 0)
            data["landmarks_3d"][j] = plan.world[specimen.name]
            data["split"][j] = split
            bar.update(1)
        write_subject(group, layout, index, data)
        records[index]["rows"] = [rows.start, rows.start + count]

    # As synth's: what decides the data (here the X-rays of the source file too), not the manifest's bytes.
    group.attrs.update(
        store_attributes(
            landmark_names=plan.names,
            subjects=records,
            camera=store_camera,
            settings=data_settings,
            seed=0,
            image_normalisation=REAL_IMAGE_NORMALISATION[settings.pixels.value],
            manifest_sha256=manifest_sha,
            manifest_path=str(out / MANIFEST_NAME),
            dataset=DATASET_NAME,
            fingerprint_extra={"source": digest.hexdigest()},
            notes={
                **({"classes": list(labelled[0])} if labelled[0] else {}),
                "padding_split": PADDING_SPLIT,
                "source_file": str(Path(os.path.abspath(source.path))),
                "source_sha256": digest.hexdigest(),
                "holdout": settings.holdout,
            },
        )
    )
    mark_finished(group, complete=True)


def _report(summary: ImportSummary, source: DeepFluoroFile, plan: _Plan, settings: ImportSettings) -> dict[str, Any]:
    poses = np.stack([item.pose for items in plan.converted.values() for item in items])
    angle_from_ap = np.rad2deg(np.linalg.norm(poses[:, :3], axis=-1))
    return {
        "source": str(Path(os.path.abspath(source.path))),
        "settings": {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(settings).items()},
        "landmarks": list(plan.names),
        "camera_full_resolution": plan.camera.to_dict(),
        "camera_store": plan.store_camera.to_dict(),
        "mirror_columns": plan.conversion.mirror_columns,
        "camera_axes_from_deepfluoro": list(plan.conversion.axes),
        "rotation_from_nominal_ap_deg": {
            "median": float(np.median(angle_from_ap)),
            "min": float(angle_from_ap.min()),
            "max": float(angle_from_ap.max()),
        },
        "specimens": [dataclasses.asdict(e) for e in summary.specimens],
        "conversion_check": {
            "tolerance_px": settings.tolerance_px,
            "median_px": summary.median_error_px,
            "max_px": summary.max_error_px,
            "unit": "pixels of the file's full-resolution detector",
            "projections": [dataclasses.asdict(c) for c in summary.checks],
        },
        "manifest": str(summary.manifest),
        "store": str(summary.store),
    }

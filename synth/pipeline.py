"""``pelmark synth``: check the inputs, then render each subject into its rows of the store.

Work is cut by subject. One process renders in-process with a per-image
progress bar; several run as Dask tasks on a ``LocalCluster`` or on an existing
``dask.distributed`` scheduler (``--scheduler tcp://HOST:PORT``), where every
worker must see the manifest's files and the store at the same paths (a shared
file system). Each task writes only its own subject's chunks.

Within a subject, a writer thread compresses and writes each rendered batch
while the next one renders (:class:`StoreWriter`); the subject is marked done
only after its last write, so a resumed run redoes exactly the subjects whose
images might be missing.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.outputs import is_empty_folder, refuse_inputs
from pelmark.manifest import Manifest, Role, Subject, load_manifest, validate_subject_data
from pelmark.store import (
    IMAGE_NORMALISATION,
    StoreLayout,
    StoreLock,
    check_compatible,
    create_store,
    done_subjects,
    is_pelmark_store,
    layout_of,
    mark_finished,
    open_store,
    remove_store,
    store_attributes,
    subject_record,
    write_subject,
)
from pelmark.synth.poses import subject_poses, subject_splits
from pelmark.synth.settings import SynthSettings, resolve_settings


@dataclasses.dataclass(frozen=True)
class SubjectJob:
    """What a worker needs to render one subject (paths, not arrays, so tasks stay small)."""

    index: int
    subject: Subject
    landmark_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SynthReport:
    store: Path
    rendered_subjects: tuple[str, ...]
    skipped_subjects: tuple[str, ...]
    n_images: int
    warnings: tuple[str, ...] = ()
    rendered_images: int = 0
    seconds: float = 0.0  # wall time of the rendering stage: CT loading, rendering and writes

    @property
    def drr_per_s(self) -> float:
        """DRRs rendered and written per second of the rendering stage (0 when nothing was rendered)."""
        return self.rendered_images / self.seconds if self.seconds > 0 else 0.0


def _device(name: str):
    from pelmark.devices import resolve_device  # torch is imported lazily in this module

    return resolve_device(name)


# ---------------------------------------------------------------- one subject


class StoreWriter:
    """Writes batches into Zarr arrays on a background thread, in the order they are put.

    Compression and file writes then overlap the rendering of the next batch. The
    queue holds at most ``depth`` batches, which bounds the memory of rendered
    images waiting to be written. Leaving the ``with`` block waits for every write;
    a write's error is raised there (or at the next :meth:`put`), unless the block
    is already raising.
    """

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pelmark-store-writer", daemon=True)

    def __enter__(self) -> "StoreWriter":
        self._thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._queue.put(None)
        self._thread.join()
        if kind is None and self._error is not None:
            raise self._error

    def put(self, array, rows: slice, values: np.ndarray) -> None:
        """Queue ``array[rows] = values``; blocks while ``depth`` batches wait."""
        if self._error is not None:
            raise self._error
        self._queue.put((array, rows, values))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after an error, drain the queue without writing
                array, rows, values = item
                try:
                    array[rows] = values
                except BaseException as error:  # noqa: BLE001 - handed to the rendering thread
                    self._error = error


def subject_geometry(job: SubjectJob, settings: SynthSettings, landmarks_world: np.ndarray) -> dict[str, np.ndarray]:
    """Poses, splits and ground-truth 2D landmarks of one subject (no rendering)."""
    import torch

    from pelmark.geometry import project_with_depth

    views = settings.views
    poses = subject_poses(
        settings.seed, job.subject.id, views, settings.rotation_range, settings.translation_range, settings.view
    )
    camera = settings.camera
    points = torch.from_numpy(landmarks_world)[None].expand(views, -1, -1)
    px, depth = project_with_depth(points, torch.from_numpy(poses), camera)
    visible = camera.contains(px) & (depth > 0)
    return {
        "pose": poses,
        "landmarks_2d": px.numpy().astype(np.float32),
        "visible": visible.numpy(),
        "landmarks_3d": np.broadcast_to(landmarks_world.astype(np.float32), (views, *landmarks_world.shape)).copy(),
        "subject": np.full(views, job.index, dtype=np.int32),
        "split": subject_splits(settings.seed, job.subject.id, job.subject.role, views, settings.novel_views),
    }


def render_subject(
    store_path: str, job: SubjectJob, settings: SynthSettings, on_images: Callable[[int], None] | None = None
) -> str:
    """Render one subject's views into the store and mark it done. Runs in a worker or in-process."""
    import torch

    from pelmark.io.ct import load_ct
    from pelmark.io.landmarks import load_landmarks
    from pelmark.synth.render import LABEL_MIN_PATH_MM, DRRRenderer, labels_from_paths

    if settings.threads:
        torch.set_num_threads(settings.threads)
    group = open_store(Path(store_path), mode="r+")
    layout = layout_of(group)
    ct = load_ct(job.subject.ct)
    landmarks_world = ct.ras_to_world(load_landmarks(job.subject.landmarks, job.landmark_names))
    data = subject_geometry(job, settings, landmarks_world)

    renderer = DRRRenderer(ct, settings.camera, settings.render, device=_device(settings.device))
    rows = layout.rows(job.index)
    images = group["images"]
    classes = None
    if layout.segmentation:
        from pelmark.io.labels import load_labels

        n_classes = len(group.attrs["classes"])
        classes = renderer.label_grid(load_labels(job.subject.segmentation).labels, ct, n_classes)
    with StoreWriter() as writer:
        for start in range(0, settings.views, settings.batch_size):
            stop = min(start + settings.batch_size, settings.views)
            store_rows = slice(rows.start + start, rows.start + stop)
            batch = renderer.render(data["pose"][start:stop]).cpu().numpy()
            writer.put(images, store_rows, batch.astype(layout.image_dtype))
            if classes is not None:  # the same rays as the images: each pixel's bone with the longest path
                paths = renderer.render_labels(data["pose"][start:stop], classes)
                writer.put(group["segmentation"], store_rows, labels_from_paths(paths, LABEL_MIN_PATH_MM).cpu().numpy())
            if on_images is not None:
                on_images(stop - start)
    write_subject(group, layout, job.index, data)  # after the last image write: marks the subject done
    return job.subject.id


# ---------------------------------------------------------------- the run


def check_inputs(manifest: Manifest, settings: SynthSettings, progress: bool = True) -> list[dict[str, Any]]:
    """Load every CT and landmark file once, before anything is written. Returns per-subject provenance.

    Raises:
        PelmarkError: besides :func:`~pelmark.manifest.validate_subject_data`'s refusals, a CT that is
            all air by the renderer's test (it has nothing to render, and rendering it used to crash
            with a store half-written).
    """
    from tqdm import tqdm

    records = []
    for index, subject in enumerate(tqdm(manifest.subjects, desc="checking inputs", unit="CT", disable=not progress)):
        ct, landmarks_world = validate_subject_data(manifest, subject)
        _refuse_all_air(ct, settings, subject)
        records.append(
            subject_record(
                index, subject.id, subject.role.value, str(subject.ct), str(subject.landmarks), ct, landmarks_world,
                **_segmentation_record(subject),
            )
        )  # fmt: skip
    return records


def _segmentation_record(subject: Subject) -> dict[str, Any]:
    """The segmentation's path and digest, for a subject that has one ({} otherwise: old fingerprints stay)."""
    if subject.segmentation is None:
        return {}
    from pelmark.io.labels import labels_digest, load_labels

    return {"segmentation": str(subject.segmentation), "segmentation_sha256": labels_digest(load_labels(subject.segmentation))}


def _refuse_all_air(ct, settings: SynthSettings, subject: Subject) -> None:
    import torch

    from pelmark.synth.render import hu_to_attenuation, solid_blocks

    render = settings.render
    if not bool(solid_blocks(torch.from_numpy(hu_to_attenuation(ct.hu, render)), render.air_threshold).any()):
        air_hu = round((render.air_threshold - 1.0) * 1000.0)
        raise PelmarkError(
            f"CT of subject {subject.id!r} is all air (no 2x2x2 block of voxels above {air_hu} HU): nothing to render; "
            "is it the right file, in Hounsfield units?",
            subject.ct,
        )


def synth_attributes(manifest: Manifest, settings: SynthSettings, subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """The store attributes of a render of ``manifest`` with ``settings`` (see :func:`pelmark.store.store_attributes`)."""
    from pelmark.synth.render import LABEL_MIN_PATH_MM

    labelled = {"classes": list(manifest.classes), "segmentation_min_path_mm": LABEL_MIN_PATH_MM} if manifest.classes else {}
    return store_attributes(
        landmark_names=manifest.landmarks,
        subjects=subjects,
        camera=settings.camera,
        settings=settings.data_fields(),
        seed=settings.seed,
        image_normalisation=IMAGE_NORMALISATION,
        manifest_sha256=manifest.sha256,
        manifest_path=str(manifest.path),
        dataset=manifest.name,
        data_attributes=labelled,
    )


def _writable_parent(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise PelmarkError(f"cannot create the output folder ({exc.strerror})", parent) from None
    if not os.access(parent, os.W_OK):
        raise PelmarkError("output folder is not writable", parent)


def _check_out(out: Path, overwrite: bool) -> None:
    """``out`` may be absent, an empty folder, or a pelmark store (resumed, or replaced with ``overwrite``)."""
    if not out.exists() or is_empty_folder(out):
        return
    if not out.is_dir():
        raise PelmarkError("exists and is not a folder; --out names the store folder", out)
    if not is_pelmark_store(out):
        replace = "--overwrite replaces only a store written by pelmark synth" if overwrite else "pick an empty or new --out"
        raise PelmarkError(f"holds files that are not a pelmark synth store; {replace}", out)


def run_synth(
    manifest_path: Path,
    out: Path,
    overrides: dict[str, Any],
    overwrite: bool = False,
    progress: bool = True,
) -> SynthReport:
    """Render the manifest's DRR dataset into ``out``, finishing only what is missing.

    Args:
        manifest_path: the cohort's TOML manifest.
        out: the Zarr store to create or resume.
        overrides: command-line settings (None = not given), over the manifest's ``[synth]``.
        overwrite: replace a store made from other inputs instead of refusing.
        progress: show progress bars.
    """
    manifest = load_manifest(manifest_path)
    out = Path(out)
    inputs = [("the manifest", manifest.path)]
    for subject in manifest.subjects:
        inputs += [(f"{subject.id}'s CT", subject.ct), (f"{subject.id}'s landmark file", subject.landmarks)]
        if subject.segmentation is not None:
            inputs.append((f"{subject.id}'s segmentation", subject.segmentation))
    refuse_inputs(out, inputs)
    _check_out(out, overwrite)
    settings = resolve_settings(manifest.synth, overrides, manifest.path)
    _device(settings.device)  # fail before anything is written
    subjects = check_inputs(manifest, settings, progress)
    attributes = synth_attributes(manifest, settings, subjects)
    _writable_parent(out)

    with StoreLock(out):
        if out.exists() and overwrite:
            remove_store(out)
        if out.exists() and not is_empty_folder(out):
            group = open_store(out, mode="r+")
            check_compatible(group, attributes, out)
        else:
            layout = StoreLayout(
                n_subjects=len(manifest.subjects),
                views=settings.views,
                height=settings.camera.height,
                width=settings.camera.width,
                n_landmarks=len(manifest.landmarks),
                image_dtype=settings.image_dtype,
                segmentation=bool(manifest.classes),
            )
            create_store(out, layout, {**attributes, "complete": False})
            group = open_store(out, mode="r+")

        done = done_subjects(group)
        jobs = [
            SubjectJob(index=i, subject=s, landmark_names=manifest.landmarks)
            for i, s in enumerate(manifest.subjects)
            if not done[i]
        ]
        skipped = tuple(s.id for i, s in enumerate(manifest.subjects) if done[i])
        started = time.perf_counter()
        _run_jobs(str(out), jobs, settings, progress)
        seconds = time.perf_counter() - started
        mark_finished(group)
        warnings = unseen_subjects(group, [s.id for s in manifest.subjects], settings.views)
    return SynthReport(
        store=out,
        rendered_subjects=tuple(j.subject.id for j in jobs),
        skipped_subjects=skipped,
        n_images=len(manifest.subjects) * settings.views,
        warnings=warnings,
        rendered_images=len(jobs) * settings.views,
        seconds=seconds,
    )


def unseen_subjects(group, subject_ids: list[str], views: int) -> tuple[str, ...]:
    """A warning for each finished subject with no landmark on the detector in any view.

    Such a subject trains nothing and scores nothing; it most often means a CT with absurd
    geometry, landmarks of another CT, or a detector far too small.
    """
    done = done_subjects(group)
    seen = np.asarray(group["visible"][:], dtype=bool).reshape(len(subject_ids), views, -1).any(axis=(1, 2))
    return tuple(
        f"subject {subject_id!r}: no landmark is on the detector in any of its {views} views "
        "(check the CT's geometry, its landmark file and the detector size)"
        for subject_id, finished, visible in zip(subject_ids, done, seen)
        if finished and not visible
    )


def _run_jobs(store_path: str, jobs: list[SubjectJob], settings: SynthSettings, progress: bool) -> None:
    from tqdm import tqdm

    if not jobs:
        return
    bar = tqdm(
        total=len(jobs) * settings.views,
        desc="rendering",
        unit="DRR",
        disable=not progress,
        # DRR/s always: tqdm would switch to s/DRR below one DRR per second.
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]",
    )
    try:
        if settings.scheduler == "sync" or (settings.scheduler == "local" and settings.workers == 1):
            for job in jobs:
                render_subject(store_path, job, settings, on_images=bar.update)
        else:
            _run_on_dask(store_path, jobs, settings, bar)
    finally:
        bar.close()


def _run_on_dask(store_path: str, jobs: list[SubjectJob], settings: SynthSettings, bar) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    if settings.scheduler == "local":
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)
        settings = dataclasses.replace(settings, threads=threads)
        cluster = LocalCluster(
            n_workers=settings.workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    elif settings.scheduler.startswith(("tcp://", "tls://", "ucx://")):
        cluster = None
        try:
            client = Client(settings.scheduler, timeout="30s")
        except OSError as exc:
            raise PelmarkError(f"cannot reach the Dask scheduler {settings.scheduler} ({exc})") from None
    else:
        raise PelmarkError(f"unknown scheduler '{settings.scheduler}' (local, sync, or tcp://HOST:PORT)")
    try:
        futures = [client.submit(render_subject, store_path, job, settings, pure=False) for job in jobs]
        for future in as_completed(futures):
            future.result()  # re-raises a worker's error here
            bar.update(settings.views)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

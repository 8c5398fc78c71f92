"""Writing a store: its arrays, its attributes and fingerprint, one subject at a time, by one writer at a time.

``pelmark synth`` and ``pelmark import-deepfluoro`` both write through here, so
a rendered and an imported store carry the same attributes, computed the same
way. A subject's rows are written first and its ``subject_done`` flag last;
zarr writes each chunk atomically (temporary file, then rename), so a run
killed at any moment leaves either a finished subject or one that the next
run redoes. A writer that builds a whole folder aside (an import) puts it in
place with :func:`pelmark.io.atomic.publish_folder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.provenance import git_revision, now_utc, package_versions
from pelmark.store.reader import _zarr, done_subjects, is_pelmark_store
from pelmark.store.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PIXEL_CONVENTION,
    POSE_CONVENTION,
    SUBJECT_ARRAYS,
    WORLD_FRAME,
    StoreLayout,
    splits_attribute,
)

if TYPE_CHECKING:
    from pelmark.geometry import Camera
    from pelmark.io.ct import CTVolume

LOCK_NAME = ".pelmark-synth.lock"


# ---------------------------------------------------------------- arrays


def format_attributes() -> dict[str, Any]:
    """The attributes that mark a folder as a store of this format."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}


def create_store(path: Path, layout: StoreLayout, attributes: Mapping[str, Any]) -> None:
    """Create an empty store with every array of ``layout`` (zero-filled) and the group attributes."""
    group = _zarr().open_group(str(path), mode="w", zarr_format=3)
    for name, (shape, dtype, chunks) in layout.arrays().items():
        group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
    group.attrs.update(dict(attributes))


def write_subject(group, layout: StoreLayout, subject_index: int, data: Mapping[str, np.ndarray]) -> None:
    """Write one subject's rows of :data:`~pelmark.store.schema.SUBJECT_ARRAYS`, then mark it done.

    The flag goes last, so a crash never leaves a false 'done'; a subject's images (and
    segmentation) must be written before this is called.
    """
    rows = layout.rows(subject_index)
    for name in SUBJECT_ARRAYS:
        group[name][rows] = data[name]
    group["subject_done"][subject_index] = True


def mark_finished(group, complete: bool | None = None) -> None:
    """Record the end of a writing run: ``complete`` (default: every subject done) and the time."""
    group.attrs["complete"] = bool(done_subjects(group).all()) if complete is None else complete
    group.attrs["finished"] = now_utc()


# ---------------------------------------------------------------- what decides the data

# What of each subject's record enters the fingerprint: its id seeds the poses, its role decides the splits.
FINGERPRINT_SUBJECT_KEYS = ("id", "role", "ct_sha256", "landmarks_sha256")


def landmarks_digest(points_world: np.ndarray) -> str:
    """sha256 of a subject's 3D landmarks as pelmark read them ((L, 3) world mm, the manifest's order)."""
    return hashlib.sha256(np.ascontiguousarray(points_world, dtype=np.float64).tobytes()).hexdigest()


def fingerprint(settings: dict[str, Any], landmark_names: list[str], subjects: list[dict[str, Any]], **extra: Any) -> str:
    """sha256 of exactly what decides a store's data, and of nothing else.

    That is the data settings (``[synth]`` less how it runs), the landmark list, and each subject's
    :data:`FINGERPRINT_SUBJECT_KEYS`: the CT's voxels and geometry, the landmark points, the id and
    the role; and a subject's ``segmentation_sha256`` when it has bone labels (a store without them
    keeps the fingerprint it had before labels existed). The manifest's bytes are not in it: its ``[train]`` table, comments and paths do not
    change the data, while a landmark file edited in place does.

    Args:
        settings: the data settings.
        landmark_names: the landmark list, in order.
        subjects: one record per subject, in store order, with at least :data:`FINGERPRINT_SUBJECT_KEYS`.
        extra: more that decides the data (synth's bone classes, an import's source file).
    """
    inputs = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "landmark_names": list(landmark_names),
        "subjects": [
            {key: record[key] for key in (*FINGERPRINT_SUBJECT_KEYS, "segmentation_sha256") if key in record}
            for record in subjects
        ],
        **extra,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def subject_record(
    index: int, subject_id: str, role: str, ct_path: str, landmarks_path: str, ct: CTVolume, landmarks_world: np.ndarray, **more: Any
) -> dict[str, Any]:
    """One entry of the ``subjects`` attribute: where the subject's files were and what they held.

    Args:
        index: the subject's index (its rows are ``layout.rows(index)``).
        subject_id, role: the manifest's id and role value.
        ct_path, landmarks_path: the files, as the store records them.
        ct: the CT that was read (its digest, shape and spacing are recorded).
        landmarks_world: (L, 3) the landmarks that were read, world mm.
        more: further keys, after these (a segmentation's path and digest, an import's projections).
    """
    return {
        "index": index,
        "id": subject_id,
        "role": role,
        "ct": ct_path,
        "landmarks": landmarks_path,
        "ct_sha256": ct.digest(),
        "landmarks_sha256": landmarks_digest(landmarks_world),
        "ct_shape": list(ct.shape),
        "ct_spacing_mm": [float(s) for s in ct.spacing_mm],
        **more,
    }


def store_attributes(
    *,
    landmark_names: Sequence[str],
    subjects: list[dict[str, Any]],
    camera: Camera,
    settings: dict[str, Any],
    seed: int,
    image_normalisation: str,
    manifest_sha256: str,
    manifest_path: str,
    dataset: str,
    data_attributes: Mapping[str, Any] | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every group attribute of a store (less ``complete`` and ``finished``), with its fingerprint and provenance.

    Args:
        landmark_names: the landmark list, in order.
        subjects: one :func:`subject_record` per subject, in store order.
        camera: the detector of every image (the ``intrinsics`` attribute).
        settings: the data settings (they enter the fingerprint).
        seed, image_normalisation, manifest_sha256, manifest_path, dataset: as the attributes say.
        data_attributes: more attributes that decide the data; they enter the fingerprint too
            (synth's ``classes`` and ``segmentation_min_path_mm``). They come first.
        fingerprint_extra: more that decides the data without being an attribute (an import's
            source digest, under the name the fingerprint has always used).
        notes: more attributes outside the fingerprint (an import's source file and padding code).
    """
    data_attributes = dict(data_attributes or {})
    return {
        **data_attributes,
        **format_attributes(),
        "landmark_names": list(landmark_names),
        "subjects": subjects,
        "splits": splits_attribute(),
        "intrinsics": {**camera.to_dict(), "pixel_convention": PIXEL_CONVENTION},
        "pose_convention": POSE_CONVENTION,
        "world_frame": WORLD_FRAME,
        "image_normalisation": image_normalisation,
        "seed": seed,
        "manifest_sha256": manifest_sha256,
        "manifest_path": manifest_path,
        "dataset": dataset,
        "settings": settings,
        **dict(notes or {}),
        "fingerprint": fingerprint(settings, list(landmark_names), subjects, **data_attributes, **dict(fingerprint_extra or {})),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "created": now_utc(),
    }


def check_compatible(group, expected: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume a store made from other inputs than ``expected`` (a :func:`store_attributes`), saying what differs.

    Only the fingerprints are compared; the rest says, in words, why they differ.
    """
    found = dict(group.attrs)
    if found.get("fingerprint") == expected["fingerprint"]:
        return
    theirs, ours = found.get("settings", {}), expected["settings"]
    differs = [f"setting '{k}' ({theirs.get(k)!r} there, {ours.get(k)!r} now)" for k in ours if theirs.get(k) != ours.get(k)]
    if found.get("landmark_names") != expected["landmark_names"]:
        differs.append("the landmark names")
    differs += _subject_differences(found.get("subjects", []), expected["subjects"])
    if not differs:
        differs.append("the store's format")
    raise PelmarkError(
        f"store was made from other inputs ({'; '.join(differs)}); use --overwrite to replace it or pick another --out",
        path,
    )


def _subject_differences(found: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    """What differs between the subjects a store was made from and the manifest's, in words."""
    if [s.get("id") for s in found] != [s["id"] for s in expected]:
        return ["the subjects (their ids or order)"]
    if any("landmarks_sha256" not in s for s in found):
        return ["written by an earlier pelmark, whose fingerprint left out the landmark files"]
    differs = []
    for then, now in zip(found, expected):
        for key, what in (("role", "role"), ("ct_sha256", "CT"), ("landmarks_sha256", "landmark points"), ("segmentation_sha256", "segmentation")):
            if then.get(key) != now.get(key):
                differs.append(f"subject {now['id']!r}'s {what}")
    return differs


# ---------------------------------------------------------------- one writer at a time


class StoreLock:
    """An exclusive lock file beside the store, so two runs never write one store at once.

    A lock left by a process that died (same host, pid gone) is taken over; a
    lock held by a live process, or one on another host, refuses the run.
    """

    def __init__(self, store: Path):
        self.path = Path(str(store).rstrip("/") + LOCK_NAME)
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                owner = self._owner()
                raise PelmarkError(
                    f"another pelmark synth (pid {owner.get('pid')} on {owner.get('host')}) is writing this store; "
                    f"wait for it, or delete {self.path.name} if that run is gone",
                    self.path.parent / self.path.name.removesuffix(LOCK_NAME),
                ) from None
            except PermissionError:
                raise PelmarkError("cannot write here (permission denied)", self.path.parent) from None
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": now_utc()}, handle)
            self._held = True
            return
        raise PelmarkError("could not take the store lock", self.path)

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        owner = self._owner()
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return not owner  # unreadable (half-written) lock: its writer died mid-write
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_store(path: Path) -> None:
    """Delete a store folder (for --overwrite), after the inputs were checked.

    Only a store pelmark wrote is deleted; an empty folder is left in place.

    Raises:
        PelmarkError: ``path`` holds something else (it is left untouched).
    """
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not is_pelmark_store(path):
        raise PelmarkError("--overwrite replaces only a store written by pelmark synth, and this is not one", path)
    shutil.rmtree(path)

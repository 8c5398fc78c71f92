"""The synth store: a Zarr v3 group whose layout is a public interface (see the README).

Subject ``s`` owns rows ``[s * views, (s + 1) * views)`` of every per-image
array, and every chunk belongs to exactly one subject, so tasks on different
machines write disjoint chunks with no coordination. A subject counts as done
only when ``subject_done[s]`` is set, which its task does last; zarr writes
each chunk atomically (temporary file, then rename), so a run killed at any
moment leaves either a finished subject or one that the next run redoes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pelmark.errors import PelmarkError

FORMAT_NAME = "pelmark-synth-store"
FORMAT_VERSION = 1
LOCK_NAME = ".pelmark-synth.lock"

IMAGE_NORMALISATION = (
    "line integral of the linear attenuation relative to water along each ray, in mm of water "
    "(mu = max(0, 1 + HU/1000)); 0 means no attenuation. Training scales each image by its own "
    "statistics; see pelmark.train."
)


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


def _zarr():
    import zarr

    return zarr


def create_store(path: Path, layout: StoreLayout, attributes: dict[str, Any]) -> None:
    """Create an empty store with every array and the group attributes."""
    zarr = _zarr()
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    n, v, l = layout.n_images, layout.views, layout.n_landmarks
    arrays = {
        "images": ((n, layout.height, layout.width), layout.image_dtype, (1, layout.height, layout.width)),
        "pose": ((n, 6), "float64", (v, 6)),
        "landmarks_2d": ((n, l, 2), "float32", (v, l, 2)),
        "visible": ((n, l), "bool", (v, l)),
        "landmarks_3d": ((n, l, 3), "float32", (v, l, 3)),
        "subject": ((n,), "int32", (v,)),
        "split": ((n,), "uint8", (v,)),
        "subject_done": ((layout.n_subjects,), "bool", (1,)),
    }
    if layout.segmentation:
        arrays["segmentation"] = ((n, layout.height, layout.width), "uint8", (1, layout.height, layout.width))
    for name, (shape, dtype, chunks) in arrays.items():
        group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
    group.attrs.update(attributes)


def open_store(path: Path, mode: str = "r"):
    """Open a pelmark store, refusing anything else with one clear line."""
    zarr = _zarr()
    if not Path(path).exists():
        raise PelmarkError("store not found", path)
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several unrelated types for a non-store folder
        raise PelmarkError(f"not a Zarr store ({type(exc).__name__}: {exc})", path) from None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise PelmarkError("not a pelmark synth store (no 'format' attribute)", path)
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        # A string "1" would otherwise read as "version 1 but this pelmark reads version 1".
        found = "missing" if version is None else f"{json.dumps(version)} (a {type(version).__name__}, not an integer)"
        raise PelmarkError(f"store attribute format_version is {found}: the store was edited or not written by pelmark", path)
    if version != FORMAT_VERSION:
        raise PelmarkError(
            f"store format version {version} but this pelmark reads version {FORMAT_VERSION}; "
            "re-run pelmark synth with this version",
            path,
        )
    return group


def done_subjects(group) -> np.ndarray:
    """Boolean (n_subjects,) mask of subjects whose task finished."""
    return np.asarray(group["subject_done"][:], dtype=bool)


def missing_parts(group) -> list[str]:
    """What an interrupted synth left out of a store, one line per subject it did not finish ([] when complete)."""
    attrs = dict(group.attrs)
    done = done_subjects(group)
    views = group["split"].shape[0] // max(len(done), 1)
    records = attrs.get("subjects") or [{"id": f"#{i}", "role": "?"} for i in range(len(done))]
    return [
        f"subject {record['id']!r} ({record['role']}) was not rendered: its {views} images are missing"
        for record, finished in zip(records, done)
        if not finished
    ]


def check_complete(path: Path, allow_incomplete: bool = False) -> list[str]:
    """Refuse a store whose synth was interrupted, unless ``allow_incomplete``; returns what is missing.

    Training on such a store silently used only the subjects that were finished, and evaluation
    silently dropped a split whose subjects were not.

    Raises:
        PelmarkError: the store is not one, or is incomplete and ``allow_incomplete`` is off.
    """
    group = open_store(Path(path))
    missing = missing_parts(group)
    if missing and not allow_incomplete:
        n = len(done_subjects(group))
        raise PelmarkError(
            f"store is incomplete (synth was interrupted): {len(missing)} of {n} subjects not rendered; "
            "run the same pelmark synth again to finish it, or pass --allow-incomplete to use what is there",
            path,
        )
    return missing


def write_subject(group, layout: StoreLayout, subject_index: int, data: dict[str, np.ndarray]) -> None:
    """Write one subject's rows, then mark it done (last, so a crash never leaves a false 'done')."""
    rows = layout.rows(subject_index)
    for name in ("pose", "landmarks_2d", "visible", "landmarks_3d", "subject", "split"):
        group[name][rows] = data[name]
    group["subject_done"][subject_index] = True


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
        extra: more that decides the data of a store not rendered by synth (an import's source file).
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


# ---------------------------------------------------------------- provenance


def git_revision() -> str | None:
    """The pelmark checkout's git revision (with '+dirty' for local changes), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("pelmark", "diffdrr", "torch", "numpy", "zarr", "SimpleITK", "dask"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


def is_pelmark_store(path: Path) -> bool:
    """True for a Zarr group carrying pelmark's ``format`` attribute, whatever its format version."""
    if not Path(path).is_dir():
        return False
    try:
        group = _zarr().open_group(str(path), mode="r")
        return dict(group.attrs).get("format") == FORMAT_NAME
    except Exception:  # noqa: BLE001 - zarr raises several unrelated types for a non-store folder
        return False


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

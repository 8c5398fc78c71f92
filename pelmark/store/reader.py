"""Reading a store: opening it (and refusing anything else), its camera and landmarks, and which rows are finished.

Every stage that reads a store selects its rows here. A subject counts as done
only when ``subject_done[s]`` is set, which its writer does last; the rows of
an unfinished subject still hold fill values (split 0, subject 0), so their
owner comes from the layout, never from the ``subject`` array.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.store.schema import FORMAT_NAME, FORMAT_VERSION, Split, StoreLayout

if TYPE_CHECKING:
    from pelmark.geometry import Camera


def _zarr():
    import zarr

    return zarr


def open_store(path: Path, mode: str = "r"):
    """Open a pelmark store as a Zarr group, refusing anything else with one clear line."""
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


def is_pelmark_store(path: Path) -> bool:
    """True for a Zarr group carrying pelmark's ``format`` attribute, whatever its format version."""
    if not Path(path).is_dir():
        return False
    try:
        group = _zarr().open_group(str(path), mode="r")
        return dict(group.attrs).get("format") == FORMAT_NAME
    except Exception:  # noqa: BLE001 - zarr raises several unrelated types for a non-store folder
        return False


def done_subjects(group) -> np.ndarray:
    """Boolean (n_subjects,) mask of subjects whose task finished."""
    return np.asarray(group["subject_done"][:], dtype=bool)


def finished_rows(group, splits: Split | Iterable[Split]) -> np.ndarray:
    """Ascending store rows whose split is one of ``splits`` and whose subject is done.

    This is the one row selection of pelmark: training, evaluation and the previews all use it.
    A row whose code is no :class:`Split` (an import's padding) is never selected.
    """
    wanted = [int(splits)] if isinstance(splits, Split) else [int(s) for s in splits]
    codes = np.asarray(group["split"][:])
    done = done_subjects(group)
    views = len(codes) // max(len(done), 1)
    owner_done = np.repeat(done, views) if views else np.zeros(len(codes), dtype=bool)
    return np.flatnonzero(np.isin(codes, wanted) & owner_done)


def layout_of(group) -> StoreLayout:
    """The layout a store was created with, from its arrays and attributes."""
    attrs = group.attrs
    n, h, w = group["images"].shape
    return StoreLayout(
        n_subjects=len(attrs["subjects"]),
        views=int(attrs["settings"]["views"]),
        height=h,
        width=w,
        n_landmarks=len(attrs["landmark_names"]),
        image_dtype=str(group["images"].dtype),
        segmentation="segmentation" in group,
    )


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


class StoreReader:
    """A store opened for reading: its camera, landmark names, subjects and finished rows.

    Args:
        path: the store folder.
        group: the store as :func:`open_store` opened it, to read through that handle
            (a dataset keeps one per process); None opens ``path``.

    Raises:
        PelmarkError: ``path`` is not a store this pelmark reads (see :func:`open_store`).
    """

    def __init__(self, path: str | Path, group=None):
        self.path = Path(path)
        self.group = open_store(self.path) if group is None else group
        self.attrs: dict[str, Any] = dict(self.group.attrs)

    @property
    def camera(self) -> Camera:
        """The detector every image was taken with (the ``intrinsics`` attribute)."""
        from pelmark.geometry import Camera  # torch: only for a reader that asks

        return Camera.from_dict(self.attrs["intrinsics"])

    @property
    def landmark_names(self) -> tuple[str, ...]:
        return tuple(self.attrs.get("landmark_names", ()))

    @property
    def classes(self) -> tuple[str, ...]:
        """The bone classes of the ``segmentation`` array (value k + 1 is ``classes[k]``); () without one."""
        return tuple(self.attrs.get("classes", ()))

    @property
    def subject_ids(self) -> tuple[str, ...]:
        return tuple(record["id"] for record in self.attrs.get("subjects", ()))

    @property
    def fingerprint(self) -> str | None:
        return self.attrs.get("fingerprint")

    @property
    def layout(self) -> StoreLayout:
        return layout_of(self.group)

    def done_subjects(self) -> np.ndarray:
        return done_subjects(self.group)

    def rows(self, splits: Split | Iterable[Split]) -> np.ndarray:
        """Finished rows of ``splits`` (see :func:`finished_rows`)."""
        return finished_rows(self.group, splits)

    def missing_parts(self) -> list[str]:
        return missing_parts(self.group)

"""pelmark.store: one row selection for training, evaluation and the previews, and fingerprints that do not move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pelmark.errors import PelmarkError
from pelmark.evaluate.predict import read_truth
from pelmark.geometry import Camera
from pelmark.store import (
    IMAGE_NORMALISATION,
    Split,
    StoreLayout,
    StoreReader,
    check_complete,
    create_store,
    fingerprint,
    mark_finished,
    open_store,
    store_attributes,
    write_subject,
)
from pelmark.train.data import DataSettings, StoreDataset

SIZE = 8
VIEWS = 4
PADDING = 255  # an import's padding code: no split


def _subject_data(index: int, splits: list[int]) -> dict[str, np.ndarray]:
    return {
        "pose": np.zeros((VIEWS, 6)),
        "landmarks_2d": np.full((VIEWS, 2, 2), 3.0, dtype=np.float32),
        "visible": np.ones((VIEWS, 2), dtype=bool),
        "landmarks_3d": np.zeros((VIEWS, 2, 3), dtype=np.float32),
        "subject": np.full(VIEWS, index, dtype=np.int32),
        "split": np.asarray(splits, dtype=np.uint8),
    }


def _store(path: Path) -> Path:
    """Three subjects of four views; the middle one never finished, so its rows hold fill values (split 0 = train)."""
    layout = StoreLayout(n_subjects=3, views=VIEWS, height=SIZE, width=SIZE, n_landmarks=2, image_dtype="float16")
    subjects = [{"id": f"s{i}", "role": role} for i, role in enumerate(("train", "train", "novel_subject"))]
    attributes = store_attributes(
        landmark_names=["A", "B"],
        subjects=subjects,
        camera=Camera.centered(SIZE, sdd_mm=1000.0, spacing_mm=2.0, sid_mm=500.0),
        settings={"views": VIEWS},
        seed=0,
        image_normalisation=IMAGE_NORMALISATION,
        manifest_sha256="0" * 64,
        manifest_path="manifest.toml",
        dataset="test",
    )
    create_store(path, layout, {**attributes, "complete": False})
    group = open_store(path, mode="r+")
    group["images"][:] = np.random.default_rng(0).random((3 * VIEWS, SIZE, SIZE)).astype(np.float16)
    write_subject(group, layout, 0, _subject_data(0, [Split.TRAIN, Split.TRAIN, Split.NOVEL_VIEW, Split.TRAIN]))
    write_subject(group, layout, 2, _subject_data(2, [Split.NOVEL_SUBJECT] * 3 + [PADDING]))
    mark_finished(group)
    return path


def test_finished_rows_leave_out_an_unfinished_subject_and_padding(tmp_path):
    reader = StoreReader(_store(tmp_path / "s.zarr"))
    # Rows 4-7 (subject s1, never finished) read as split 0 = train: only the layout says whose they are.
    assert reader.rows(Split.TRAIN).tolist() == [0, 1, 3]
    assert reader.rows(Split.NOVEL_VIEW).tolist() == [2]
    assert reader.rows(Split.NOVEL_SUBJECT).tolist() == [8, 9, 10]
    assert reader.rows([Split.NOVEL_VIEW, Split.NOVEL_SUBJECT]).tolist() == [2, 8, 9, 10]
    assert reader.done_subjects().tolist() == [True, False, True]
    assert reader.landmark_names == ("A", "B") and reader.subject_ids == ("s0", "s1", "s2")
    assert reader.camera.height == SIZE and reader.layout.views == VIEWS


def test_train_and_evaluate_select_the_readers_rows(tmp_path):
    store = _store(tmp_path / "s.zarr")
    reader = StoreReader(store)
    for splits in [(Split.TRAIN,), (Split.NOVEL_VIEW,), (Split.NOVEL_SUBJECT,), (Split.NOVEL_VIEW, Split.NOVEL_SUBJECT)]:
        dataset = StoreDataset(store, DataSettings(size=SIZE, splits=splits, targets=False))
        np.testing.assert_array_equal(dataset.rows, reader.rows(splits))
    for split in (Split.TRAIN, Split.NOVEL_VIEW, Split.NOVEL_SUBJECT):
        np.testing.assert_array_equal(read_truth(store, split, SIZE).rows, reader.rows(split))


def test_an_unfinished_store_is_refused_unless_allowed(tmp_path):
    store = _store(tmp_path / "s.zarr")
    with pytest.raises(PelmarkError, match="1 of 3 subjects not rendered"):
        check_complete(store)
    assert check_complete(store, allow_incomplete=True) == ["subject 's1' (train) was not rendered: its 4 images are missing"]
    assert open_store(store).attrs["complete"] is False


# Fingerprints of stores already written must keep matching: these values come from pelmark
# before the store moved into pelmark.store (synth/store.py at b49b422), on the same inputs.
SETTINGS = {"views": 4, "height": 8, "width": 8, "seed": 3}
SUBJECTS = [
    {"id": "a", "role": "train", "ct_sha256": "0" * 64, "landmarks_sha256": "1" * 64, "ct": "not in the fingerprint"},
    {"id": "b", "role": "novel_subject", "ct_sha256": "2" * 64, "landmarks_sha256": "3" * 64, "segmentation_sha256": "4" * 64},
]


def test_fingerprints_are_those_of_earlier_stores():
    labelled = {"classes": ["hemipelvis-l"], "segmentation_min_path_mm": 1.0}
    common = dict(
        landmark_names=["A", "B"], subjects=SUBJECTS, camera=Camera.centered(8), settings=SETTINGS, seed=3,
        image_normalisation=IMAGE_NORMALISATION, manifest_sha256="5" * 64, manifest_path="m.toml", dataset="d",
    )  # fmt: skip
    synth = store_attributes(**common, data_attributes=labelled)
    imported = store_attributes(**common, fingerprint_extra={"source": "f" * 64}, notes={"classes": ["hemipelvis-l"]})
    assert synth["fingerprint"] == fingerprint(SETTINGS, ["A", "B"], SUBJECTS, **labelled)
    assert synth["fingerprint"] == "fae63471decf90f03d9333a676dfa1a67f25cf1ce5a8f96107d0de936376a9c5"
    assert imported["fingerprint"] == "6f08a4ce1362590e4a475ffe52e0ab848be086bf09752308cc840b35b7f2e095"
    assert synth["classes"] == imported["classes"] == ["hemipelvis-l"] and "segmentation_min_path_mm" not in imported

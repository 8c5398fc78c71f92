"""Manifests: loading, every validation error, the landmark-in-CT check, and writing."""

from __future__ import annotations

import hashlib
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume, save_ct
from pelmark.io.landmarks import write_landmarks_csv
from pelmark.manifest import Role, Subject, dumps_toml, load_manifest, validate_subject_data, write_manifest

NAMES = ("SPS", "IPS")
HEADER = '[dataset]\nname = "demo"\nlandmarks = ["SPS", "IPS"]\n'

# A 5^3 CT at 2 mm: voxel centres 0..4 map to RAS 100..108 etc., so its centre (index 2) is RAS (104, 54, -16)
# and its extent, voxel edges included, is +-5 mm around it.
CT_AFFINE = np.array([[2.0, 0, 0, 100.0], [0, 2.0, 0, 50.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1.0]])
CT_CENTER_RAS = np.array([104.0, 54.0, -16.0])


def _subject_toml(
    subject_id: str = "s000", ct: str = "ct/s000.nii.gz", landmarks: str = "landmarks/s000.csv", role: str = "train"
) -> str:
    return f'\n[[subjects]]\nid = "{subject_id}"\nct = "{ct}"\nlandmarks = "{landmarks}"\nrole = "{role}"\n'


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A folder with one small CT and landmarks inside it; returns the folder."""
    (tmp_path / "ct").mkdir()
    (tmp_path / "landmarks").mkdir()
    ct = CTVolume(hu=np.zeros((5, 5, 5), dtype=np.float32), affine_ras=CT_AFFINE)
    save_ct(ct, tmp_path / "ct" / "s000.nii.gz")
    points_ras = CT_CENTER_RAS + np.array([[3.0, -2.0, 4.5], [-4.0, 1.0, -1.0]])
    write_landmarks_csv(tmp_path / "landmarks" / "s000.csv", NAMES, points_ras)
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "manifest.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_manifest(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(dataset, HEADER + _subject_toml() + "\n[synth]\nviews = 100\n[eval]\nsplit = 'novel'\n")
    # A relative manifest path from elsewhere still resolves subject paths against the manifest's folder.
    monkeypatch.chdir(dataset.parent)
    manifest = load_manifest(Path(dataset.name) / "manifest.toml")
    assert manifest.path == path
    assert manifest.name == "demo"
    assert manifest.landmarks == NAMES
    expected = Subject("s000", dataset / "ct" / "s000.nii.gz", dataset / "landmarks" / "s000.csv", Role.TRAIN)
    assert manifest.subjects == (expected,)
    assert manifest.synth == {"views": 100} and manifest.train == {} and manifest.eval == {"split": "novel"}
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.subjects_with_role(Role.NOVEL_SUBJECT) == ()


BAD_MANIFESTS = {
    "invalid toml": (HEADER + "[[subjects]\n", "invalid TOML: .*line"),
    "no dataset": (_subject_toml(), r"missing \[dataset\]"),
    "no landmarks": ('[dataset]\nname = "demo"\n' + _subject_toml(), r"\[dataset\] needs 'landmarks'"),
    "empty landmarks": ('[dataset]\nname = "demo"\nlandmarks = []\n' + _subject_toml(), "non-empty list"),
    "blank landmark": (
        '[dataset]\nname = "demo"\nlandmarks = ["SPS", " "]\n' + _subject_toml(),
        r'\[dataset\] landmarks must be a non-empty list of landmark names, got \["SPS", " "\]',
    ),
    "duplicate landmark": (
        '[dataset]\nname = "demo"\nlandmarks = ["SPS", "IPS", "sps"]\n' + _subject_toml(),
        "repeats SPS, sps",
    ),
    "no subjects": (HEADER, "no subjects"),
    "duplicate subject": (HEADER + _subject_toml() + _subject_toml(), "duplicate subject id 's000'"),
    "unknown role": (HEADER + _subject_toml(role="test"), r"unknown role 'test' \(allowed: train, novel_subject\)"),
    "missing ct": (HEADER + _subject_toml(ct="ct/absent.nii.gz"), "subject 's000': CT not found: .*absent.nii.gz"),
    "missing landmarks": (
        HEADER + _subject_toml(landmarks="landmarks/absent.csv"),
        "subject 's000': landmark file not found: .*absent.csv",
    ),
    "typo in table": (HEADER + _subject_toml() + "\n[sytnh]\nviews = 3\n", "unknown top-level key: 'sytnh'"),
    "typo in subject": (HEADER + _subject_toml().replace("role", "rloe"), "unknown key in subject 's000': 'rloe'"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest(dataset: Path, case: str) -> None:
    text, match = BAD_MANIFESTS[case]
    path = _write(dataset, text)
    with pytest.raises(PelmarkError, match=match) as info:
        load_manifest(path)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(PelmarkError, match="manifest not found"):
        load_manifest(tmp_path / "absent.toml")


def test_validate_subject_data_returns_world_landmarks(dataset: Path) -> None:
    manifest = load_manifest(_write(dataset, HEADER + _subject_toml()))
    ct, points_world = validate_subject_data(manifest, manifest.subjects[0])
    assert ct.shape == (5, 5, 5)
    np.testing.assert_allclose(points_world, [[3.0, -2.0, 4.5], [-4.0, 1.0, -1.0]], atol=1e-4)


def test_validate_subject_data_flags_landmark_outside_ct(dataset: Path) -> None:
    # 6 mm past the centre along x is beyond the 5 mm half-extent.
    points_ras = CT_CENTER_RAS + np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    write_landmarks_csv(dataset / "landmarks" / "s000.csv", NAMES, points_ras)
    manifest = load_manifest(_write(dataset, HEADER + _subject_toml()))
    with pytest.raises(PelmarkError, match="outside .*: IPS") as info:
        validate_subject_data(manifest, manifest.subjects[0])
    assert info.value.path == dataset / "landmarks" / "s000.csv"
    assert "SPS" not in str(info.value).split(":")[-1]


def test_write_manifest_round_trip(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "s001.csv"
    elsewhere.write_text((dataset / "landmarks" / "s000.csv").read_text())
    subjects = (
        Subject("s000", dataset / "ct" / "s000.nii.gz", dataset / "landmarks" / "s000.csv", Role.TRAIN),
        Subject("s001", dataset / "ct" / "s000.nii.gz", elsewhere, Role.NOVEL_SUBJECT),
    )
    synth = {"views": 100, "spacing_mm": 0.388, "flip": False, "ranges": [1, 2.5], "note": 'a "quoted" \\ é\nline'}
    train = {"lr": 1e-4, "optimizer": {"name": "adam", "betas": [0.9, 0.999]}}
    path = dataset / "written.toml"
    write_manifest(path, "demo", NAMES, subjects, synth=synth, train=train)

    text = path.read_text(encoding="utf-8")
    assert 'ct = "ct/s000.nii.gz"' in text  # inside the manifest folder: relative
    assert f'landmarks = "{elsewhere}"' in text  # outside it: absolute
    manifest = load_manifest(path)
    assert manifest.name == "demo" and manifest.landmarks == NAMES
    assert manifest.subjects == subjects
    assert manifest.synth == synth and manifest.train == train and manifest.eval == {}


def test_dumps_toml_round_trips_through_tomllib() -> None:
    document = {
        "top": 1,
        "weird key": "x",
        "floats": [0.1, -0.0, 1e-300, 1e300, math.inf, -math.inf],
        "table": {"a": True, "deep": {"b": "\x01\x7f\t"}},
        "rows": [{"id": "r0"}, {"id": "r1", "sub": {"k": 2}}],
        "empty": [],
    }
    assert tomllib.loads(dumps_toml(document)) == document
    with pytest.raises(TypeError, match="none_value"):
        dumps_toml({"none_value": None})


def test_sha256_changes_with_the_file(dataset: Path) -> None:
    path = _write(dataset, HEADER + _subject_toml())
    first = load_manifest(path).sha256
    assert load_manifest(path).sha256 == first
    path.write_text(path.read_text() + "# a comment changes the digest\n")
    assert load_manifest(path).sha256 != first


def test_write_manifest_with_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    # `pelmark phantom outputs/phantom` passes paths like outputs/phantom/ct/s000.nii.gz.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "ct").mkdir(parents=True)
    (tmp_path / "out" / "ct" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "out" / "a.mrk.json").write_text("{}")
    subject = Subject(id="a", ct=Path("out/ct/a.nii.gz"), landmarks=Path("out/a.mrk.json"), role=Role.TRAIN)
    write_manifest(Path("out/manifest.toml"), "rel", ["X"], [subject])
    assert 'ct = "ct/a.nii.gz"' in (tmp_path / "out" / "manifest.toml").read_text()
    loaded = load_manifest(tmp_path / "out" / "manifest.toml")
    assert loaded.subjects[0].ct == tmp_path / "out" / "ct" / "a.nii.gz"


# TOML holds 64-bit integers; NaN is left out because it never equals itself.
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
)
toml_arrays = st.recursive(st.lists(toml_scalars, max_size=4), lambda inner: st.lists(inner, max_size=3), max_leaves=12)
toml_keys = st.text(max_size=12)
toml_tables = st.recursive(
    st.dictionaries(toml_keys, toml_scalars | toml_arrays, max_size=5),
    lambda tables: st.dictionaries(
        toml_keys, toml_scalars | toml_arrays | tables | st.lists(tables, min_size=1, max_size=3), max_size=5
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(document=toml_tables)
def test_dumps_toml_round_trips_any_document(document) -> None:
    # Any keys (dots, quotes, control characters, empty), nested tables and arrays of tables.
    assert tomllib.loads(dumps_toml(document)) == document

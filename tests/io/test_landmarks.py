"""Landmark files: every format and frame, name matching, and bad files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pelmark.errors import PelmarkError
from pelmark.io.landmarks import Frame, load_landmarks, write_fcsv, write_landmarks_csv, write_mrk_json
from pelmark.landmark_sets import DEEPFLUORO_LANDMARKS, PAPER_LANDMARKS

NAMES = ("ASIS-l", "SPS", "label, with comma")
POINTS_RAS = np.array([[-120.25, 15.5, 30.0], [0.125, 60.0, -45.75], [98.0, -3.0, 1e-3]])

WRITERS: dict[str, tuple[str, Callable[..., None]]] = {
    "mrk.json": (".mrk.json", write_mrk_json),
    "fcsv": (".fcsv", write_fcsv),
    "csv": (".csv", write_landmarks_csv),
}


@pytest.mark.parametrize("frame", ("RAS", "LPS"))
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_round_trip(tmp_path: Path, kind: str, frame: str) -> None:
    suffix, write = WRITERS[kind]
    path = tmp_path / f"points{suffix}"
    write(path, NAMES, POINTS_RAS, frame)
    np.testing.assert_array_equal(load_landmarks(path, NAMES), POINTS_RAS)
    # Read back in another order: rows follow the requested names.
    np.testing.assert_array_equal(load_landmarks(path, NAMES[::-1]), POINTS_RAS[::-1])
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary file left behind"


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_lps_file_stores_negated_x_y(tmp_path: Path, kind: str) -> None:
    suffix, write = WRITERS[kind]
    path = tmp_path / f"points{suffix}"
    write(path, NAMES[:1], POINTS_RAS[:1], "LPS")
    # (-120.25, 15.5, 30) RAS is (120.25, -15.5, 30) LPS.
    assert "120.25" in path.read_text() and "-120.25" not in path.read_text()


def test_writers_accept_frame_enum(tmp_path: Path) -> None:
    path = tmp_path / "enum.fcsv"
    write_fcsv(path, NAMES, POINTS_RAS, Frame.LPS)
    assert "# CoordinateSystem = LPS" in path.read_text()
    np.testing.assert_array_equal(load_landmarks(path, NAMES), POINTS_RAS)


def test_hand_written_lps_mrk_json(tmp_path: Path) -> None:
    path = tmp_path / "hand.mrk.json"
    path.write_text(
        json.dumps(
            {
                "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                "Resources/Schema/markups-schema-v1.0.3.json#",
                "markups": [
                    {
                        "type": "Fiducial",
                        "coordinateSystem": "LPS",
                        "controlPoints": [
                            {"label": "F-1", "position": [1.0, 2.0, 3.0]},
                            {"label": "SPS", "position": [10.0, -20.0, 30.0]},
                        ],
                    }
                ],
            }
        )
    )
    expected_ras = [[-10.0, 20.0, 30.0], [-1.0, -2.0, 3.0]]
    np.testing.assert_array_equal(load_landmarks(path, ["SPS", "F-1"]), expected_ras)


def test_mrk_json_without_coordinate_system_is_lps(tmp_path: Path) -> None:
    # The Slicer markups schema's default frame is LPS.
    path = tmp_path / "default.mrk.json"
    markup = {"type": "Fiducial", "controlPoints": [{"label": "a", "position": [1, 2, 3]}]}
    path.write_text(json.dumps({"markups": [markup]}))
    np.testing.assert_array_equal(load_landmarks(path, ["a"]), [[-1.0, -2.0, 3.0]])


def test_mrk_json_skips_unplaced_points(tmp_path: Path) -> None:
    path = tmp_path / "unplaced.mrk.json"
    points = [
        {"label": "a", "position": [0, 0, 0], "positionStatus": "undefined"},
        {"label": "b", "position": [1, 1, 1]},
    ]
    markup = {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": points}
    path.write_text(json.dumps({"markups": [markup]}))
    with pytest.raises(PelmarkError, match="missing landmarks: a"):
        load_landmarks(path, ["a", "b"])


@pytest.mark.parametrize("code, sign", (("0", 1.0), ("1", -1.0), ("RAS", 1.0), ("LPS", -1.0)))
def test_fcsv_coordinate_system_codes(tmp_path: Path, code: str, sign: float) -> None:
    # Old Slicer wrote 0 for RAS and 1 for LPS.
    path = tmp_path / "old.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.6\n"
        f"# CoordinateSystem = {code}\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,5,6,7,0,0,0,1,1,1,0,IPS,,\n"
    )
    np.testing.assert_array_equal(load_landmarks(path, ["IPS"]), [[5.0 * sign, 6.0 * sign, 7.0]])


def test_fcsv_without_coordinate_system_fails(tmp_path: Path) -> None:
    path = tmp_path / "nohdr.fcsv"
    path.write_text("vtkMRMLMarkupsFiducialNode_0,5,6,7,0,0,0,1,1,1,0,IPS,,\n")
    with pytest.raises(PelmarkError, match="CoordinateSystem") as info:
        load_landmarks(path, ["IPS"])
    assert info.value.path == path


def test_names_match_case_insensitively_and_ignore_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    path.write_text("# frame = RAS\nname,x,y,z\n  asis-L ,1,2,3\nsps,4,5,6\nextra,7,8,9\n")
    np.testing.assert_array_equal(load_landmarks(path, ["SPS", "ASIS-l"]), [[4, 5, 6], [1, 2, 3]])


def test_missing_names_are_listed_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "few.mrk.json"
    write_mrk_json(path, ["ASIS-l"], POINTS_RAS[:1])
    with pytest.raises(PelmarkError) as info:
        load_landmarks(path, PAPER_LANDMARKS)
    message = str(info.value)
    assert str(path) in message
    assert "IOF-l" in message and "ASIS-r" in message
    assert "ASIS-l," not in message  # present landmarks are not reported missing


def test_plain_csv_without_frame_fails(tmp_path: Path) -> None:
    path = tmp_path / "noframe.csv"
    path.write_text("name,x,y,z\nSPS,1,2,3\n")
    with pytest.raises(PelmarkError, match="frame") as info:
        load_landmarks(path, ["SPS"])
    assert str(path) in str(info.value)


def test_nan_coordinates_fail(tmp_path: Path) -> None:
    path = tmp_path / "nan.csv"
    path.write_text("# frame = LPS\nSPS,nan,2,3\nIPS,1,2,3\n")
    with pytest.raises(PelmarkError, match="NaN.*SPS"):
        load_landmarks(path, ["SPS", "IPS"])


def test_nan_in_an_ignored_landmark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "nan_extra.csv"
    path.write_text("# frame = RAS\nSPS,nan,2,3\nIPS,1,2,3\n")
    np.testing.assert_array_equal(load_landmarks(path, ["IPS"]), [[1, 2, 3]])


def test_duplicate_landmark_fails(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("# frame = RAS\nSPS,1,2,3\nsps,4,5,6\n")
    with pytest.raises(PelmarkError, match="more than once: SPS"):
        load_landmarks(path, ["SPS"])


def test_bad_number_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("# frame = RAS\nSPS,one,2,3\n")
    with pytest.raises(PelmarkError, match="row 1"):
        load_landmarks(path, ["SPS"])
    with pytest.raises(PelmarkError, match="not found"):
        load_landmarks(tmp_path / "absent.fcsv", ["SPS"])
    (tmp_path / "broken.mrk.json").write_text("{not json")
    with pytest.raises(PelmarkError, match="invalid JSON"):
        load_landmarks(tmp_path / "broken.mrk.json", ["SPS"])


def test_landmark_sets() -> None:
    assert len(PAPER_LANDMARKS) == 8 and PAPER_LANDMARKS[0] == "ASIS-l" and PAPER_LANDMARKS[-1] == "ASIS-r"
    assert len(DEEPFLUORO_LANDMARKS) == len(set(DEEPFLUORO_LANDMARKS)) == 14
    # Every paper landmark but the midline SPS/IPS has a DeepFluoro counterpart.
    assert set(PAPER_LANDMARKS) - set(DEEPFLUORO_LANDMARKS) == {"SPS", "IPS"}

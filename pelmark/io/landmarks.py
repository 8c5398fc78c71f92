"""3D landmark files: 3D Slicer markups (``.mrk.json``, ``.fcsv``) and a plain CSV.

Whatever the file's frame, points come back in scanner RAS mm (the frame of a
:class:`~pelmark.io.ct.CTVolume`'s ``affine_ras``), ordered as the caller's
landmark names. A frame is never guessed: LPS and RAS differ only by the sign
of x and y, so a wrong guess gives plausible but mirrored landmarks.

Formats
-------
``.mrk.json``
    Slicer markups JSON. Each markup's ``coordinateSystem`` is honoured; the
    schema's default, LPS, applies when the key is absent. Control points
    whose ``positionStatus`` is ``undefined`` or ``missing`` count as absent.
``.fcsv``
    Slicer fiducial CSV. The ``# CoordinateSystem = RAS|LPS|0|1`` header line
    is required (0 is RAS and 1 is LPS, as older Slicer wrote them).
``.csv``
    ``name,x,y,z`` rows after a required ``# frame = RAS`` (or ``LPS``) line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.atomic import write_text_atomic
from pelmark.io.ct import LPS_RAS_FLIP


FCSV_COLUMNS = (
    "id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"
)  # fmt: skip
MRK_JSON_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)


class Frame(str, Enum):
    """The patient frame a landmark file's coordinates are written in."""

    RAS = "RAS"
    LPS = "LPS"

    @classmethod
    def parse(cls, value: object, path: Path | None = None) -> "Frame":
        """A frame from its name in any case, or Slicer's legacy code (0 = RAS, 1 = LPS)."""
        if isinstance(value, cls):
            return value
        text = str(value).strip().upper()
        legacy = {"0": cls.RAS, "1": cls.LPS}
        if text in legacy:
            return legacy[text]
        try:
            return cls(text)
        except ValueError:
            raise PelmarkError(f"unknown coordinate system {value!r} (expected RAS or LPS)", path) from None


def _to_ras(points: np.ndarray, frame: Frame) -> np.ndarray:
    return points * LPS_RAS_FLIP if frame is Frame.LPS else points


def _from_ras(points_ras: np.ndarray, frame: Frame) -> np.ndarray:
    # The RAS<->LPS map is its own inverse.
    return _to_ras(points_ras, frame)


def _normalise(name: str) -> str:
    return name.strip().casefold()


# ---------------------------------------------------------------- reading


def load_landmarks(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """Read the landmarks ``names`` from a landmark file, in scanner RAS mm.

    Args:
        path: a ``.mrk.json``, ``.fcsv`` or ``.csv`` file.
        names: the landmarks wanted, matched case-insensitively and ignoring
            surrounding whitespace. Other landmarks in the file are ignored.

    Returns:
        (L, 3) float64 points, row i for ``names[i]``.

    Raises:
        PelmarkError: the file is missing or malformed, or a wanted landmark is
            absent, duplicated or not finite.
    """
    path = Path(path)
    wanted = [_normalise(n) for n in names]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"landmark names must be unique (case-insensitive): {list(names)}")
    if not path.is_file():
        raise PelmarkError("landmark file not found", path)
    suffix = path.name.lower()
    if suffix.endswith(".json"):
        labelled = _read_mrk_json(path)
    elif suffix.endswith(".fcsv"):
        labelled = _read_fcsv(path)
    elif suffix.endswith(".csv"):
        labelled = _read_plain_csv(path)
    else:
        raise PelmarkError("unsupported landmark file type (expected .mrk.json, .fcsv or .csv)", path)
    return _select(labelled, names, path)


def _select(labelled: list[tuple[str, np.ndarray]], names: Sequence[str], path: Path) -> np.ndarray:
    """Rows of ``labelled`` for ``names``, in order, checking each appears once and is finite."""
    found: dict[str, list[np.ndarray]] = {_normalise(n): [] for n in names}
    for label, point in labelled:
        key = _normalise(label)
        if key in found:
            found[key].append(point)
    missing = [n for n in names if not found[_normalise(n)]]
    if missing:
        raise PelmarkError(f"missing landmarks: {', '.join(missing)}", path)
    repeated = [n for n in names if len(found[_normalise(n)]) > 1]
    if repeated:
        raise PelmarkError(f"landmarks given more than once: {', '.join(repeated)}", path)
    points = np.stack([found[_normalise(n)][0] for n in names]).astype(np.float64)
    bad = [n for n, p in zip(names, points) if not np.all(np.isfinite(p))]
    if bad:
        raise PelmarkError(f"landmarks with NaN or infinite coordinates: {', '.join(bad)}", path)
    return points


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PelmarkError(f"cannot read landmark file ({exc})", path) from None


def _parse_xyz(values: Sequence[str], path: Path, where: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise PelmarkError(f"{where}: expected three numbers, found {list(values)}", path) from None


def _read_mrk_json(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        document = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise PelmarkError(f"invalid JSON ({exc})", path) from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise PelmarkError("not a Slicer markups file: no 'markups' list", path)
    labelled = []
    for m, markup in enumerate(markups):
        if not isinstance(markup, dict):
            raise PelmarkError(f"markups[{m}] is not an object", path)
        frame = Frame.parse(markup.get("coordinateSystem", "LPS"), path)
        scale = _units_to_mm(markup.get("coordinateUnits", "mm"), path)
        for p, point in enumerate(markup.get("controlPoints") or []):
            if not isinstance(point, dict):
                raise PelmarkError(f"markups[{m}].controlPoints[{p}] is not an object", path)
            if point.get("positionStatus", "defined") in ("undefined", "missing") or "position" not in point:
                continue
            position = point["position"]
            where = f"markups[{m}].controlPoints[{p}]"
            if not isinstance(position, list) or len(position) != 3:
                raise PelmarkError(f"{where}: position must be three numbers", path)
            # JSON has no NaN, but Slicer's writer and Python's json both accept the token.
            xyz = _parse_xyz(position, path, where) * scale
            labelled.append((str(point.get("label", "")), _to_ras(xyz, frame)))
    return labelled


def _units_to_mm(units: object, path: Path) -> float:
    """Scale from Slicer's ``coordinateUnits`` (a UCUM code, or a [code, scheme, meaning] triple) to mm."""
    code = units[0] if isinstance(units, list) and units else units
    scales = {"mm": 1.0, "um": 1e-3}
    if code not in scales:
        raise PelmarkError(f"unsupported coordinateUnits {units!r} (expected mm or um)", path)
    return scales[code]


def _read_fcsv(path: Path) -> list[tuple[str, np.ndarray]]:
    frame = None
    columns = list(FCSV_COLUMNS)
    rows = []
    for line in _read_text(path).splitlines():
        if line.startswith("#"):
            key, sep, value = line.lstrip("#").partition("=")
            key = key.strip().lower()
            if sep and key == "coordinatesystem":
                frame = Frame.parse(value, path)
            elif sep and key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    if frame is None:
        raise PelmarkError("no '# CoordinateSystem = RAS|LPS' header line; cannot tell RAS from LPS", path)
    missing_columns = {"x", "y", "z", "label"} - set(columns)
    if missing_columns:
        raise PelmarkError(f"'# columns' header lacks {', '.join(sorted(missing_columns))}", path)
    index = {c: i for i, c in enumerate(columns)}
    labelled = []
    for number, fields in enumerate(csv.reader(rows), start=1):
        if len(fields) <= max(index["x"], index["y"], index["z"], index["label"]):
            raise PelmarkError(f"point row {number} has only {len(fields)} fields", path)
        xyz = _parse_xyz([fields[index[c]] for c in "xyz"], path, f"point row {number}")
        labelled.append((fields[index["label"]], _to_ras(xyz, frame)))
    return labelled


def _read_plain_csv(path: Path) -> list[tuple[str, np.ndarray]]:
    frame = None
    rows = []
    for line in _read_text(path).splitlines():
        if line.lstrip().startswith("#"):
            key, sep, value = line.lstrip().lstrip("#").partition("=")
            if sep and key.strip().lower() == "frame":
                frame = Frame.parse(value, path)
        elif line.strip():
            rows.append(line)
    if frame is None:
        raise PelmarkError("no '# frame = RAS' (or LPS) header line; cannot tell RAS from LPS", path)
    labelled = []
    for number, fields in enumerate(csv.reader(rows), start=1):
        if number == 1 and fields and fields[0].strip().lower() == "name":
            continue
        if len(fields) < 4:
            raise PelmarkError(f"row {number}: expected name,x,y,z", path)
        xyz = _parse_xyz(fields[1:4], path, f"row {number}")
        labelled.append((fields[0], _to_ras(xyz, frame)))
    return labelled


# ---------------------------------------------------------------- writing


def _check_points(names: Sequence[str], points_ras: np.ndarray) -> np.ndarray:
    points = np.asarray(points_ras, dtype=np.float64)
    if points.shape != (len(names), 3):
        raise ValueError(f"expected points of shape ({len(names)}, 3), got {points.shape}")
    return points


def write_mrk_json(
    path: str | Path, names: Sequence[str], points_ras: np.ndarray, coordinate_system: Frame | str = "LPS"
) -> None:
    """Write a Slicer markups JSON point list (Slicer's own default frame is LPS)."""
    frame = Frame.parse(coordinate_system)
    points = _from_ras(_check_points(names, points_ras), frame)
    control_points = [
        {"id": str(i + 1), "label": name, "position": [float(v) for v in xyz], "positionStatus": "defined"}
        for i, (name, xyz) in enumerate(zip(names, points))
    ]
    document = {
        "@schema": MRK_JSON_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": frame.value,
                "coordinateUnits": "mm",
                "controlPoints": control_points,
            }
        ],
    }
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def write_fcsv(
    path: str | Path, names: Sequence[str], points_ras: np.ndarray, coordinate_system: Frame | str = "LPS"
) -> None:
    """Write a Slicer fiducial CSV (format version 4.11, which names its frame)."""
    frame = Frame.parse(coordinate_system)
    points = _from_ras(_check_points(names, points_ras), frame)
    buffer = io.StringIO()
    buffer.write("# Markups fiducial file version = 4.11\n")
    buffer.write(f"# CoordinateSystem = {frame.value}\n")
    buffer.write(f"# columns = {','.join(FCSV_COLUMNS)}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for i, (name, xyz) in enumerate(zip(names, points)):
        writer.writerow([f"{i + 1}", *(repr(float(v)) for v in xyz), 0, 0, 0, 1, 1, 1, 0, name, "", ""])
    write_text_atomic(path, buffer.getvalue())


def write_landmarks_csv(
    path: str | Path, names: Sequence[str], points_ras: np.ndarray, frame: Frame | str = "RAS"
) -> None:
    """Write the plain ``name,x,y,z`` CSV with its ``# frame`` line."""
    frame = Frame.parse(frame)
    points = _from_ras(_check_points(names, points_ras), frame)
    buffer = io.StringIO()
    buffer.write(f"# frame = {frame.value}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "x", "y", "z"])
    for name, xyz in zip(names, points):
        writer.writerow([name, *(repr(float(v)) for v in xyz)])
    write_text_atomic(path, buffer.getvalue())

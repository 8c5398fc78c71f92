"""Dataset manifests: one TOML file that names the landmarks, the subjects and their files.

Example::

    [dataset]
    name = "phantom-demo"
    landmarks = ["ASIS-l", "IOF-l", "MOF-l", "SPS", "IPS", "MOF-r", "IOF-r", "ASIS-r"]

    [[subjects]]
    id = "s000"
    ct = "ct/s000.nii.gz"                # relative to the manifest file
    landmarks = "landmarks/s000.mrk.json"
    role = "train"                       # train | novel_subject
    segmentation = "seg/s000.nii.gz"     # optional: bone labels on the CT's grid ([dataset] classes)

    [synth]                              # optional: [synth], [train], [eval]
    views = 100

:func:`load_manifest` checks everything that is cheap (the TOML, names, roles,
that each file exists) so that a typo fails in a second, not after an hour
of synthesis. :func:`validate_subject_data` does the expensive check: it
loads a subject's CT and landmarks and makes sure the landmarks lie inside
the CT, which is what a RAS/LPS mix-up breaks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume, load_ct
from pelmark.io.atomic import write_text_atomic
from pelmark.io.landmarks import load_landmarks

_TABLES = ("dataset", "subjects", "synth", "train", "eval")
_SUBJECT_KEYS = ("id", "ct", "landmarks", "role", "segmentation")
# Voxel sizes of any CT (mm); outside them the header is wrong (cm or m units, or corrupt) and the DRRs garbage.
PLAUSIBLE_SPACING_MM = (0.1, 10.0)


class Role(str, Enum):
    """What a subject is used for: training data, or held out as an unseen patient."""

    TRAIN = "train"
    NOVEL_SUBJECT = "novel_subject"


@dataclasses.dataclass(frozen=True)
class Subject:
    """One patient: a CT, its 3D landmarks, its role, and optionally its bone labels. Paths are absolute."""

    id: str
    ct: Path
    landmarks: Path
    role: Role
    segmentation: Path | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A loaded, checked manifest.

    Attributes:
        path: absolute path of the manifest file.
        name: the dataset's name.
        landmarks: landmark names, in the order every stage uses.
        subjects: the subjects, in file order.
        synth, train, eval: the optional settings tables, as parsed.
        sha256: digest of the manifest's bytes, for provenance.
        classes: the bone classes of the subjects' segmentations (``[dataset] classes``): label value
            ``k + 1`` is ``classes[k]``, 0 is background; () when the cohort has no segmentations.
    """

    path: Path
    name: str
    landmarks: tuple[str, ...]
    subjects: tuple[Subject, ...]
    synth: dict[str, Any] = dataclasses.field(hash=False)
    train: dict[str, Any] = dataclasses.field(hash=False)
    eval: dict[str, Any] = dataclasses.field(hash=False)
    sha256: str
    classes: tuple[str, ...] = ()

    def subjects_with_role(self, role: Role) -> tuple[Subject, ...]:
        return tuple(s for s in self.subjects if s.role is role)


# ---------------------------------------------------------------- loading


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest without loading any CT.

    Raises:
        PelmarkError: naming the manifest file and the first problem found.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PelmarkError("manifest not found", path) from None
    except OSError as exc:
        raise PelmarkError(f"cannot read manifest ({exc.strerror})", path) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PelmarkError("invalid TOML: the file is not UTF-8 text", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise PelmarkError(f"invalid TOML: {exc}", path) from None

    _check_keys(document, _TABLES, "top-level key", path)
    name, landmarks = _parse_dataset(document.get("dataset"), path)
    classes = _parse_classes(document["dataset"], path)
    base = Path(os.path.abspath(path)).parent
    subjects = _parse_subjects(document.get("subjects"), base, path)
    _check_segmentations(subjects, classes, path)
    settings = {}
    for table in ("synth", "train", "eval"):
        value = document.get(table, {})
        if not isinstance(value, dict):
            raise PelmarkError(f"[{table}] must be a table", path)
        settings[table] = value
    return Manifest(
        path=Path(os.path.abspath(path)),
        name=name,
        landmarks=landmarks,
        subjects=subjects,
        synth=settings["synth"],
        train=settings["train"],
        eval=settings["eval"],
        sha256=hashlib.sha256(raw).hexdigest(),
        classes=classes,
    )


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], what: str, path: Path) -> None:
    # Unknown keys are nearly always typos ("landmark", "[sytnh]"), which would otherwise be ignored.
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise PelmarkError(f"unknown {what}: {unknown[0]!r} (allowed: {', '.join(allowed)})", path)


def _parse_dataset(dataset: Any, path: Path) -> tuple[str, tuple[str, ...]]:
    from pelmark.validation import DatasetTable, check

    if not isinstance(dataset, dict):
        raise PelmarkError("missing [dataset] table", path)
    checked = check(DatasetTable, dataset, "[dataset]", path)
    names = tuple(checked["landmarks"])
    folded = [n.casefold() for n in names]
    repeated = sorted({n for n in names if folded.count(n.casefold()) > 1})
    if repeated:
        repeats = ", ".join(repeated)
        raise PelmarkError(f"[dataset] 'landmarks' repeats {repeats} (names are case-insensitive)", path)
    return checked["name"], names


def _parse_classes(dataset: dict[str, Any], path: Path) -> tuple[str, ...]:
    """``[dataset] classes``: bone class names, distinct (case-insensitively), at most 255."""
    classes = tuple(dataset.get("classes") or ())
    folded = [c.casefold() for c in classes]
    repeated = sorted({c for c in classes if folded.count(c.casefold()) > 1})
    if repeated:
        raise PelmarkError(f"[dataset] 'classes' repeats {', '.join(repeated)} (names are case-insensitive)", path)
    if len(classes) > 255:
        raise PelmarkError(f"[dataset] 'classes' names {len(classes)} classes; a uint8 label holds at most 255", path)
    return classes


def _check_segmentations(subjects: tuple[Subject, ...], classes: tuple[str, ...], path: Path) -> None:
    """Segmentations need ``[dataset] classes`` to name their values, and with classes every subject needs one."""
    with_labels = [s.id for s in subjects if s.segmentation is not None]
    if with_labels and not classes:
        raise PelmarkError(f"subject {with_labels[0]!r} has a 'segmentation' but [dataset] has no 'classes' naming its values", path)
    without = [s.id for s in subjects if s.segmentation is None]
    if classes and without:
        raise PelmarkError(f"[dataset] names 'classes' but subject {without[0]!r} has no 'segmentation'", path)


def _parse_subjects(subjects: Any, base: Path, path: Path) -> tuple[Subject, ...]:
    if subjects is None or subjects == []:
        raise PelmarkError("no subjects (add [[subjects]] tables)", path)
    if not isinstance(subjects, list) or not all(isinstance(s, dict) for s in subjects):
        raise PelmarkError("'subjects' must be [[subjects]] tables", path)
    parsed: list[Subject] = []
    ids: set[str] = set()
    for index, table in enumerate(subjects):
        subject_id = table.get("id")
        if not isinstance(subject_id, str) or not subject_id.strip():
            raise PelmarkError(f"subjects[{index}] needs a non-empty string 'id'", path)
        where = f"subject {subject_id!r}"
        _check_keys(table, _SUBJECT_KEYS, f"key in {where}", path)
        if subject_id in ids:
            raise PelmarkError(f"duplicate subject id {subject_id!r}", path)
        ids.add(subject_id)
        for key in ("ct", "landmarks", "role"):
            if not isinstance(table.get(key), str) or not table[key].strip():
                raise PelmarkError(f"{where} needs a string '{key}'", path)
        try:
            role = Role(table["role"])
        except ValueError:
            allowed = ", ".join(r.value for r in Role)
            message = f"{where} has unknown role {table['role']!r} (allowed: {allowed})"
            raise PelmarkError(message, path) from None
        ct = Path(os.path.abspath(base / Path(table["ct"]).expanduser()))
        landmarks = Path(os.path.abspath(base / Path(table["landmarks"]).expanduser()))
        if not ct.exists():
            raise PelmarkError(f"{where}: CT not found: {ct}", path)
        if not landmarks.is_file():
            raise PelmarkError(f"{where}: landmark file not found: {landmarks}", path)
        segmentation = None
        if "segmentation" in table:
            if not isinstance(table["segmentation"], str) or not table["segmentation"].strip():
                raise PelmarkError(f"{where}: 'segmentation' must be a non-empty string (a file path)", path)
            segmentation = Path(os.path.abspath(base / Path(table["segmentation"]).expanduser()))
            if not segmentation.is_file():
                raise PelmarkError(f"{where}: segmentation not found: {segmentation}", path)
        parsed.append(Subject(id=subject_id, ct=ct, landmarks=landmarks, role=role, segmentation=segmentation))
    return tuple(parsed)


def validate_subject_data(manifest: Manifest, subject: Subject) -> tuple[CTVolume, np.ndarray]:
    """Load a subject's CT and landmarks and check every landmark lies inside the CT.

    Returns:
        The CT and the (L, 3) landmarks in the pelmark world frame (centred RAS mm),
        ordered as ``manifest.landmarks``.

    Raises:
        PelmarkError: a file is unreadable, the CT's voxel spacing is outside
            :data:`PLAUSIBLE_SPACING_MM` (a header in other units, or corrupt), or a
            landmark is outside the CT (most often a landmark file in LPS declared
            as RAS, or the wrong CT).
    """
    ct = load_ct(subject.ct)
    spacing = ct.spacing_mm
    low, high = PLAUSIBLE_SPACING_MM
    if not np.all((spacing >= low) & (spacing <= high)):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise PelmarkError(
            f"implausible voxel spacing {shown} mm (a CT's lies between {low:g} and {high:g} mm): check the file's header",
            subject.ct,
        )
    points_ras = load_landmarks(subject.landmarks, manifest.landmarks)
    points_world = ct.ras_to_world(points_ras)
    inside = ct.contains_world(points_world)
    if not np.all(inside):
        outside = [n for n, ok in zip(manifest.landmarks, inside) if not ok]
        raise PelmarkError(
            f"subject {subject.id!r}: landmarks outside the extent of CT {subject.ct}: {', '.join(outside)}"
            " (check the file's RAS/LPS frame)",
            subject.landmarks,
        )
    if subject.segmentation is not None:
        validate_segmentation(manifest, subject, ct)
    return ct, points_world


def validate_segmentation(manifest: Manifest, subject: Subject, ct: CTVolume) -> np.ndarray:
    """Load a subject's label volume and check it is on its CT's grid and uses only ``manifest.classes``.

    Returns:
        The (I, J, K) uint8 labels.

    Raises:
        PelmarkError: unreadable, on another grid (the message says how it differs), or a value
            above the number of classes.
    """
    from pelmark.io.labels import check_label_grid, load_labels

    volume = load_labels(subject.segmentation)
    check_label_grid(volume, ct, subject.id)
    highest = int(volume.labels.max()) if volume.labels.size else 0
    if highest > len(manifest.classes):
        raise PelmarkError(
            f"subject {subject.id!r}: segmentation has label {highest} but [dataset] names {len(manifest.classes)} classes",
            subject.segmentation,
        )
    return volume.labels


# ---------------------------------------------------------------- writing


def write_manifest(
    path: str | Path,
    name: str,
    landmarks: Sequence[str],
    subjects: Sequence[Subject],
    synth: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
    eval: Mapping[str, Any] | None = None,
    classes: Sequence[str] = (),
) -> None:
    """Write a manifest that :func:`load_manifest` reads back (``classes``: the segmentations' ``[dataset] classes``).

    Subject paths inside the manifest's folder are written relative to it, so
    the dataset folder can move as a whole; others stay absolute.
    """
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    document: dict[str, Any] = {
        "dataset": {"name": name, "landmarks": list(landmarks), **({"classes": list(classes)} if classes else {})},
        "subjects": [
            {
                "id": s.id,
                "ct": _relative_to(s.ct, base),
                "landmarks": _relative_to(s.landmarks, base),
                "role": Role(s.role).value,
                **({"segmentation": _relative_to(s.segmentation, base)} if s.segmentation is not None else {}),
            }
            for s in subjects
        ],
    }
    for table, values in (("synth", synth), ("train", train), ("eval", eval)):
        if values:
            document[table] = dict(values)
    write_text_atomic(path, dumps_toml(document))


def _relative_to(path: Path, base: Path) -> str:
    # A relative subject path means relative to the working directory, as for any Python path
    # (Subject paths are absolute once loaded); writing it unchanged would re-root it at the manifest.
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- a small TOML writer

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps_toml(document: Mapping[str, Any]) -> str:
    """TOML text for nested mappings of str, int, float, bool and lists of them.

    A list of mappings becomes an array of tables (``[[key]]``). The standard
    library reads TOML but does not write it; this covers what manifests and
    run settings hold, without a dependency.
    """
    lines: list[str] = []
    _emit_table(lines, (), document, array=False)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, Mapping) for v in value)


def _emit_table(lines: list[str], prefix: tuple[str, ...], table: Mapping[str, Any], array: bool) -> None:
    if prefix:
        header = ".".join(_toml_key(k) for k in prefix)
        lines.extend(["", f"[[{header}]]" if array else f"[{header}]"])
    # Plain values must come before any sub-table header, or TOML would file them under it.
    nested = []
    for key, value in table.items():
        if isinstance(value, Mapping) or _is_table_array(value):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
    for key, value in nested:
        if isinstance(value, Mapping):
            _emit_table(lines, (*prefix, key), value, array=False)
        else:
            for item in value:
                _emit_table(lines, (*prefix, key), item, array=True)


def _toml_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        # repr gives the shortest round-tripping form, and 'inf', '-inf', 'nan' as TOML spells them.
        return repr(float(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, os.PathLike):
        return _toml_string(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    raise TypeError(f"cannot write {key!r} = {value!r} ({type(value).__name__}) to TOML")

"""Table 1 and the other CSV outputs of ``pelmark eval``.

``table1.csv`` follows the paper's Table 1: header ``split,model,Mean,L1,...,Ln``
(the landmark behind each ``Lk`` is listed in ``summary.json``), one row per
split and model, RMSE in model pixels with two decimals. RMSE_l is
``sqrt(mean_i d_il²)`` over the images where landmark l is visible, and Mean
is the mean of the L columns (:mod:`pelmark.train.metrics`). A diverged run
shows ``DIV`` under Mean and ``-`` under each landmark, as in the paper; a
value that is undefined (a landmark never visible in the split) shows ``n/a``.
The ``table1_<unit>.csv`` files have the same shape in the other units.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pelmark.evaluate.pose import PoseErrors, success_key
from pelmark.evaluate.predict import Predictions
from pelmark.evaluate.refine import Refinement
from pelmark.evaluate.units import Unit, to_unit
from pelmark.train.metrics import landmark_rmse, mean_rmse

DIV = "DIV"
UNDEFINED = "n/a"

TABLE_FILES = {
    Unit.MODEL_PX: "table1.csv",
    Unit.DETECTOR_PX: "table1_detector_px.csv",
    Unit.DETECTOR_MM: "table1_mm_detector.csv",
    Unit.ISOCENTRE_MM: "table1_mm_isocentre.csv",
}

PER_IMAGE_FIELDS = (
    "split", "model", "row", "subject", "landmark", "visible", "pred_x", "pred_y", "true_x", "true_y",
    "error_model_px", "error_detector_px", "error_detector_mm", "error_isocentre_mm",
    "peak_probability", "found", "refine_flag",
)  # fmt: skip
POSE_IMAGE_FIELDS = ("split", "model", "registration", "row", "subject", "degenerate", "rotation_deg", "translation_mm", "mtre_mm")


def landmark_labels(n_landmarks: int) -> list[str]:
    """``L1`` ... ``Ln``: the paper's column names."""
    return [f"L{i + 1}" for i in range(n_landmarks)]


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One row of a Table 1.

    Attributes:
        split: the split's label (``novel_view``, ``novel_subject``, ...).
        model: the run's name, or the reference's.
        status: the run's status (``COMPLETE``, ``DIV``, ...) or ``reference``.
        rmse: per-landmark RMSE (NaN where undefined); None for a diverged run.
    """

    split: str
    model: str
    status: str
    rmse: tuple[float, ...] | None

    @property
    def diverged(self) -> bool:
        return self.rmse is None

    @property
    def mean(self) -> float | None:
        return None if self.rmse is None else mean_rmse(np.asarray(self.rmse))

    def cells(self, n_landmarks: int) -> list[str]:
        """The row as the CSV writes it."""
        if self.rmse is None:
            return [self.split, self.model, DIV, *["-"] * n_landmarks]
        return [self.split, self.model, _number(self.mean), *(_number(v) for v in self.rmse)]

    def to_dict(self, labels: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {"split": self.split, "model": self.model, "status": self.status}
        if self.rmse is None:
            values["Mean"] = DIV
            values.update({label: None for label in labels})
        else:
            values["Mean"] = _json_number(self.mean)
            values.update({label: _json_number(v) for label, v in zip(labels, self.rmse)})
        return values


def _number(value: float | None) -> str:
    return UNDEFINED if value is None or not math.isfinite(value) else f"{value:.2f}"


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def rmse_per_landmark(predictions: Predictions, unit: Unit) -> np.ndarray:
    """(L,) Table-1 RMSE of each landmark in ``unit`` (NaN for a landmark never visible)."""
    truth = predictions.truth
    predicted = to_unit(predictions.predicted_px, unit, truth.model_camera, truth.store_camera)
    true = to_unit(truth.true_px, unit, truth.model_camera, truth.store_camera)
    usable = truth.visible & np.isfinite(predicted).all(-1)
    return landmark_rmse(np.nan_to_num(predicted), true, usable)


def table_row(predictions: Predictions, unit: Unit, status: str) -> TableRow:
    return TableRow(predictions.truth.split.label, predictions.model, status, tuple(float(v) for v in rmse_per_landmark(predictions, unit)))


def diverged_row(split: str, model: str) -> TableRow:
    return TableRow(split, model, DIV, None)


def table_text(rows: Iterable[TableRow], n_landmarks: int) -> str:
    """The CSV text of a Table 1."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "model", "Mean", *landmark_labels(n_landmarks)])
    for row in rows:
        writer.writerow(row.cells(n_landmarks))
    return buffer.getvalue()


def format_table(rows: Iterable[TableRow], n_landmarks: int, mean_intervals: dict[tuple[str, str], str] | None = None) -> str:
    """A Table 1 as aligned text (for the terminal): text left-aligned, numbers right-aligned.

    Args:
        rows: the table's rows.
        n_landmarks: landmark columns.
        mean_intervals: text of each row's Mean interval by (split, model),
            shown in a ``95% CI`` column beside Mean; None: no such column.
    """
    rows = list(rows)
    lines = [["split", "model", "Mean", *landmark_labels(n_landmarks)]] + [r.cells(n_landmarks) for r in rows]
    if mean_intervals is not None:
        column = ["95% CI"] + [mean_intervals.get((r.split, r.model), "") for r in rows]
        lines = [line[:3] + [cell] + line[3:] for line, cell in zip(lines, column)]
    return align_columns(lines, left=2)


def align_columns(lines: list[list[str]], left: int) -> str:
    """Rows of cells as aligned text: the first ``left`` columns flush left, the others flush right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def write_per_image(
    path: Path, predictions: Iterable[Predictions], landmark_names: list[str], refinements: Iterable[Refinement] = ()
) -> int:
    """``per_image.csv``: one line per image and landmark of every predictor. Returns the line count.

    Points are in model px; errors are empty for a landmark that is not visible.
    ``peak_probability`` and ``found`` (the detector's decision, see
    :meth:`Predictions.found`) are empty for a predictor without heatmaps;
    a ``<run>+reg`` row repeats its run's peak probability, and its ``found``
    says whether the landmark voted in the registration
    (:meth:`Predictions.votes`, the same as ``found`` for a model without a
    visibility output or a canvas margin). ``refine_flag`` is set on
    ``<run>+reg`` rows only (see :class:`~pelmark.evaluate.refine.RefineFlag`).
    """
    refined = {id(r.predictions): r for r in refinements}
    count = 0
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PER_IMAGE_FIELDS)
        for pred in predictions:
            truth = pred.truth
            errors = pred.errors()
            refinement = refined.get(id(pred))
            found = None if pred.peak_probability is None else (refinement.found if refinement else pred.found())
            for i, row in enumerate(truth.rows):
                for l, name in enumerate(landmark_names):
                    visible = bool(truth.visible[i, l])
                    writer.writerow([
                        truth.split.label, pred.model, int(row), truth.subject_ids[i], name, int(visible),
                        f"{pred.predicted_px[i, l, 0]:.3f}", f"{pred.predicted_px[i, l, 1]:.3f}",
                        f"{truth.true_px[i, l, 0]:.3f}", f"{truth.true_px[i, l, 1]:.3f}",
                        *(_error(errors[unit][i, l]) for unit in Unit),
                        "" if pred.peak_probability is None else f"{pred.peak_probability[i, l]:.4f}",
                        "" if found is None else int(found[i, l]),
                        "" if refinement is None else refinement.flags(i, l),
                    ])  # fmt: skip
                    count += 1
    return count


def _error(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else ""


def pose_fields(thresholds_mm: tuple[float, ...]) -> list[str]:
    return [
        "split", "model", "registration", "status", "images", "degenerate",
        "rotation_deg_mean", "rotation_deg_median", "translation_mm_mean", "translation_mm_median",
        "mtre_mm_mean", "mtre_mm_median", *(success_key(t) for t in thresholds_mm),
    ]  # fmt: skip


def write_pose_summary(path: Path, rows: list[dict[str, Any]], thresholds_mm: tuple[float, ...]) -> None:
    """``pose.csv``: one line per split, model and registration (a diverged run's metrics are empty)."""
    fields = pose_fields(thresholds_mm)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else ("" if isinstance(v, float) else v)) for k, v in row.items() if k in fields})


def write_pose_per_image(path: Path, entries: Iterable[tuple[Predictions, PoseErrors]]) -> None:
    """``pose_per_image.csv``: every image's pose errors for each predictor and registration."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(POSE_IMAGE_FIELDS)
        for pred, errors in entries:
            truth = pred.truth
            for i, row in enumerate(truth.rows):
                writer.writerow([
                    truth.split.label, pred.model, errors.registration.value, int(row), truth.subject_ids[i],
                    int(errors.degenerate[i]), f"{errors.rotation_deg[i]:.4f}", f"{errors.translation_mm[i]:.4f}",
                    f"{errors.mtre_mm[i]:.4f}",
                ])  # fmt: skip

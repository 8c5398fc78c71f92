"""The statistics outputs of ``pelmark eval``: ``table1_ci.csv``, ``comparison.csv``, ``robust.csv``.

All in model px, the unit of Table 1; the methods are those of
:mod:`pelmark.evaluate.stats`.

table1_ci.csv
    ``split, model, status, Mean, Mean_lo, Mean_hi, L1, L1_lo, L1_hi, ...,
    n_subjects, n_images, resampled``: every Table-1 cell with its 95 %
    bootstrap interval; ``resampled`` says whether subjects or (for a split
    with a single subject) images were resampled. A diverged run reads ``DIV``.
comparison.csv
    ``split, model, baseline, Mean, baseline_Mean, difference, lo, hi,
    relative_pct, p_value, resampled, note``: every other row of the table
    (runs, ``+reg`` rows, the reference) against the first run given, paired
    by image; then each other run's ``+reg`` row against that run's raw row. ``note`` says why a row has no numbers, or that the model sizes
    (hence the px) differ.
robust.csv
    ``split, model, status, n_visible, median_px, p90_px, within_2px,
    within_5px, within_10px``: the distribution of the visible landmarks'
    errors beside the RMSE (shares are fractions).

One set of resamples is drawn per split, from ``numpy.random.default_rng([seed,
split code])``, and shared by every predictor on that split, so a rerun gives
the same numbers and the intervals of two rows come from the same draws.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pelmark.evaluate.predict import Predictions, SplitTruth
from pelmark.evaluate.refine import REFINED_SUFFIX
from pelmark.evaluate.stats import (
    CONFIDENCE,
    WITHIN_PX,
    Interval,
    ResampleUnit,
    Resampling,
    RmseIntervals,
    bootstrap_rmse,
    paired_difference,
    resampling,
    robust_figures,
    within_key,
)
from pelmark.evaluate.tables import DIV, TableRow, align_columns, landmark_labels
from pelmark.evaluate.units import Unit

CI_FILE, COMPARISON_FILE, ROBUST_FILE = "table1_ci.csv", "comparison.csv", "robust.csv"

COMPARISON_FIELDS = (
    "split", "model", "baseline", "Mean", "baseline_Mean", "difference", "lo", "hi", "relative_pct", "p_value",
    "resampled", "note",
)  # fmt: skip
ROBUST_FIELDS = ("split", "model", "status", "n_visible", "median_px", "p90_px", *(within_key(t) for t in WITHIN_PX))


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One row of Table 1 and the predictions behind it (None for a diverged run)."""

    row: TableRow
    predictions: Predictions | None


def ci_fields(n_landmarks: int) -> list[str]:
    cells = [f"{label}{suffix}" for label in ["Mean", *landmark_labels(n_landmarks)] for suffix in ("", "_lo", "_hi")]
    return ["split", "model", "status", *cells, "n_subjects", "n_images", "resampled"]


def squared_errors_px(predictions: Predictions) -> np.ndarray:
    """(N, L) squared error in model px, NaN where the landmark is not visible (as Table 1 counts)."""
    return np.square(predictions.errors()[Unit.MODEL_PX])


def split_resampling(truth: SplitTruth, n_resamples: int, seed: int) -> Resampling:
    """The split's bootstrap draws, from a generator fixed by ``seed`` and the split."""
    generator = np.random.default_rng([int(seed), int(truth.split)])
    return resampling(truth.subject_ids, n_resamples, generator)


# ---------------------------------------------------------------- rows


def interval_rows(entries: Sequence[Entry], draws: dict[str, Resampling]) -> list[dict[str, Any]]:
    """``table1_ci.csv`` rows in table order (``draws`` by split label)."""
    rows = []
    for entry in entries:
        row = entry.row
        values: dict[str, Any] = {"split": row.split, "model": row.model, "status": row.status}
        if entry.predictions is None:
            values["Mean"] = DIV
            rows.append(values)
            continue
        cells = bootstrap_rmse(squared_errors_px(entry.predictions), draws[row.split])
        values.update(_interval_cells(cells))
        rows.append(values)
    return rows


def _interval_cells(cells: RmseIntervals) -> dict[str, Any]:
    values: dict[str, Any] = {}
    labels = landmark_labels(len(cells.landmarks))
    for label, interval in zip(["Mean", *labels], [cells.mean, *cells.landmarks]):
        values.update({label: interval.value, f"{label}_lo": interval.lo, f"{label}_hi": interval.hi})
    values.update({"n_subjects": cells.n_subjects, "n_images": cells.n_images, "resampled": cells.unit.value})
    return values


def comparison_rows(entries: Sequence[Entry], baseline: str, draws: dict[str, Resampling]) -> list[dict[str, Any]]:
    """``comparison.csv`` rows: per split, every row but the baseline's against the baseline (paired),
    then every other run's ``<run>+reg`` row against its own raw ``<run>`` row."""
    rows = []
    for split in dict.fromkeys(e.row.split for e in entries):
        shown = [e for e in entries if e.row.split == split]
        by_name = {e.row.model: e for e in shown}
        base = by_name.get(baseline)
        pairs = [(base, baseline, e) for e in shown if e is not base]
        refined = [e for e in shown if e.row.model.endswith(REFINED_SUFFIX)]
        for entry in refined:
            raw_name = entry.row.model.removesuffix(REFINED_SUFFIX)
            if raw_name != baseline and raw_name in by_name:
                pairs.append((by_name[raw_name], raw_name, entry))
        for reference, reference_name, entry in pairs:
            values: dict[str, Any] = {"split": split, "model": entry.row.model, "baseline": reference_name}
            if reference is None or reference.predictions is None:
                values["note"] = "baseline diverged (DIV)"
            elif entry.predictions is None:
                values["note"] = "diverged (DIV)"
            else:
                values.update(_paired(reference.predictions, entry.predictions, draws[split]))
            rows.append(values)
    return rows


def _paired(base: Predictions, other: Predictions, draws: Resampling) -> dict[str, Any]:
    if not np.array_equal(base.truth.rows, other.truth.rows):
        raise RuntimeError(f"{other.model} and {base.model} were evaluated on different images")
    result = paired_difference(squared_errors_px(base), squared_errors_px(other), draws)
    note = ""
    if base.truth.size != other.truth.size:
        note = f"model sizes differ ({other.truth.size} vs {base.truth.size}): px differ"
    return {
        "Mean": result.other_mean,
        "baseline_Mean": result.baseline_mean,
        "difference": result.difference.value,
        "lo": result.difference.lo,
        "hi": result.difference.hi,
        "relative_pct": result.relative_pct,
        "p_value": result.p_value,
        "resampled": result.unit.value,
        "note": note,
    }


def robust_rows(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """``robust.csv`` rows in table order (a diverged run's figures are empty)."""
    rows = []
    for entry in entries:
        values: dict[str, Any] = {"split": entry.row.split, "model": entry.row.model, "status": entry.row.status}
        if entry.predictions is not None:
            figures = robust_figures(entry.predictions.errors()[Unit.MODEL_PX])
            values.update({"n_visible": int(figures.pop("n")), "median_px": figures.pop("median"), "p90_px": figures.pop("p90")})
            values.update(figures)
        rows.append(values)
    return rows


# ---------------------------------------------------------------- files and text


def write_rows(path: Path, fields: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """A CSV of ``rows`` (missing and NaN cells empty; floats with up to 4 decimals, p-values 4 significant digits)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(k, v) for k, v in row.items()})


def _cell(key: str, value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return ""
        return f"{value:.4g}" if key == "p_value" else f"{value:.4f}"
    return value


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """``comparison.csv`` as aligned text for the terminal."""
    lines = [["split", "model", "vs", "Mean", "difference", "95% CI", "change", "p"]]
    for row in rows:
        if "difference" not in row:
            lines.append([row["split"], row["model"], row["baseline"], "-", "-", "-", "-", row.get("note", "")])
            continue
        lines.append([
            row["split"], row["model"], row["baseline"], f"{row['Mean']:.2f}", f"{row['difference']:+.2f}",
            _bracket(Interval(row["difference"], row["lo"], row["hi"]), signed=True),
            _percent(row["relative_pct"]), _p(row["p_value"]),
        ])  # fmt: skip
    return align_columns(lines, left=3)


def _bracket(interval: Interval, signed: bool = False) -> str:
    if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
        return "[n/a]"
    form = "+.2f" if signed else ".2f"
    return f"[{interval.lo:{form}}, {interval.hi:{form}}]"


def _percent(value: float) -> str:
    return f"{value:+.1f}%" if math.isfinite(value) else "n/a"


def _p(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "n/a"


def mean_intervals(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """``[lo, hi]`` of each row's Mean by (split, model), for the printed Table 1."""
    return {
        (row["split"], row["model"]): _bracket(Interval(row["Mean"], row["Mean_lo"], row["Mean_hi"]))
        for row in rows
        if "Mean_lo" in row
    }


def resampling_notes(draws: dict[str, Resampling]) -> tuple[str, ...]:
    """A note for each split whose intervals resample images (it has a single subject)."""
    return tuple(
        f"{split}: {draw.n_subjects} subject, so its intervals resample images, "
        "which ignores that views of one CT are alike (too narrow)"
        for split, draw in draws.items()
        if draw.unit is ResampleUnit.IMAGES
    )


def statistics_summary(
    draws: dict[str, Resampling],
    baseline: str,
    ci_rows: list[dict[str, Any]],
    compared: list[dict[str, Any]],
    robust: list[dict[str, Any]],
    seed: int,
) -> dict[str, Any]:
    """The ``statistics`` section of ``summary.json``: methods, settings and every row."""
    return {
        "unit": Unit.MODEL_PX.value,
        "resamples": next(iter(draws.values())).n_resamples if draws else 0,
        "seed": seed,
        "generator": "numpy.random.default_rng([seed, split code]), one set of resamples per split shared by its rows",
        "confidence": CONFIDENCE,
        "interval": "percentile (2.5th and 97.5th of the resampled statistic)",
        "resampling": (
            "cluster bootstrap: draw the split's subjects with replacement, pool their images, recompute "
            "RMSE_l and Mean; a split with one subject resamples images instead"
        ),
        "resampled": {
            split: {"unit": d.unit.value, "subjects": d.n_subjects, "images": d.n_images} for split, d in draws.items()
        },
        "comparison": {
            "baseline": baseline,
            "difference": "Mean(model) - Mean(baseline), paired: the same resamples and images for both",
            "p_value": "two-sided: min(1, 2 min(1 + #{d_b <= 0}, 1 + #{d_b >= 0}) / (B + 1)) over the resampled differences d_b",
        },
        "robust": "over the visible landmarks of all images: median, 90th percentile, share within 2, 5 and 10 px",
        "files": {"intervals": CI_FILE, "comparison": COMPARISON_FILE, "robust": ROBUST_FILE},
        "table1_ci": ci_rows,
        "comparison_rows": compared,
        "robust_rows": robust,
    }

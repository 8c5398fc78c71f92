"""``pelmark eval``: evaluate trained runs on a store's held-out splits, as the paper's Table 1 and more.

Order of work
    Everything that can be wrong with the inputs is checked first (each run
    loads and predicts the store's landmarks, the store has the splits), so a
    bad input costs one line and no output. Results are then written into a
    temporary folder beside OUT, which is renamed to OUT at the end: OUT is
    either absent, or complete.
What is written into OUT
    ``table1.csv`` (RMSE in model px, the paper's unit) and
    ``table1_detector_px.csv``, ``table1_mm_detector.csv``,
    ``table1_mm_isocentre.csv`` (same shape, other units; see
    :mod:`pelmark.evaluate.units`); ``per_image.csv`` (every image and
    landmark of every predictor); ``pose.csv`` and ``pose_per_image.csv``
    (see :mod:`pelmark.evaluate.pose`); ``table1_ci.csv``,
    ``comparison.csv`` and ``robust.csv`` (bootstrap intervals, paired
    comparisons with the first run, robust error figures; see
    :mod:`pelmark.evaluate.stat_tables`); ``visibility.csv`` (each model's
    calls of which landmarks are present, and the Dice of a predicted
    segmentation; see :mod:`pelmark.evaluate.visibility`); the figures of
    :mod:`pelmark.evaluate.figures`; ``summary.json`` with all of it, the
    landmark behind each ``Lk`` column, invisible-landmark counts, run
    statuses and the store's fingerprint.
Refined rows
    With ``refine``, each run gets a ``<run>+reg`` row in every table
    (:mod:`pelmark.evaluate.refine`), from the robust registration already
    computed for ``pose.csv``.
Diverged runs
    A run whose ``run.json`` says ``DIV`` is not evaluated (as in the paper,
    its row reads ``DIV``), whether or not it left weights from before the
    divergence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.atomic import publish_folder
from pelmark.io.outputs import is_empty_folder, refuse_inputs
from pelmark.evaluate.figures import write_error_cdf, write_per_landmark_error, write_samples
from pelmark.evaluate.pose import SUCCESS_THRESHOLDS_MM, PoseErrors, Registration, pose_metrics
from pelmark.devices import resolve_device
from pelmark.evaluate.predict import Predictions, SplitTruth, flip_choice, predict_split, read_truth
from pelmark.evaluate.reference import REFERENCE_NAME, MeanPosition, fit_mean_position, predict_mean_position
from pelmark.evaluate.refine import REFINED_SUFFIX, failure_notes, refine, refine_summary
from pelmark.evaluate.stat_tables import (
    CI_FILE,
    COMPARISON_FIELDS,
    COMPARISON_FILE,
    ROBUST_FIELDS,
    ROBUST_FILE,
    Entry,
    ci_fields,
    comparison_rows,
    interval_rows,
    resampling_notes,
    robust_rows,
    split_resampling,
    statistics_summary,
    write_rows,
)
from pelmark.evaluate.stats import DEFAULT_RESAMPLES
from pelmark.evaluate.tables import (
    TABLE_FILES,
    TableRow,
    diverged_row,
    landmark_labels,
    table_row,
    table_text,
    write_per_image,
    write_pose_per_image,
    write_pose_summary,
)
from pelmark.evaluate.units import Unit
from pelmark.evaluate.visibility import (
    PresenceRule,
    presence,
    registered_presence,
    validation_rule,
    visibility_rows,
    write_visibility,
)
from pelmark.provenance import git_revision, now_utc, package_versions
from pelmark.store import Split, check_complete, finished_rows, open_store
from pelmark.train.checkpoint import TrainedRun, load_run
from pelmark.train.config import RunStatus

EVAL_FORMAT = "pelmark-eval"
EVAL_VERSION = 1
# Written first into every results folder: --overwrite replaces only a folder that carries it.
EVAL_MARKER = ".pelmark-eval"
DEFAULT_SPLITS = (Split.NOVEL_VIEW, Split.NOVEL_SUBJECT)

UNIT_NOTES = {
    Unit.MODEL_PX: "pixels of the model input (size x size), the unit of the paper's Table 1",
    Unit.DETECTOR_PX: "pixels of the store's detector",
    Unit.DETECTOR_MM: "mm in the detector plane (detector px x pixel spacing)",
    Unit.ISOCENTRE_MM: "mm at the isocentre (detector mm / magnification sdd/sid)",
}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How ``pelmark eval`` runs.

    Attributes:
        splits: splits to evaluate; None means novel_view and novel_subject,
            those the store has (an error if it has neither). A split asked
            for by name must be in the store.
        samples: images per split in the ``samples_<split>.png`` figures.
        batch_size: images per forward pass.
        workers: DataLoader worker processes (StoreDataset also builds training
            targets, which costs more than the image at size 512).
        device: auto (CUDA if present), cpu, cuda or cuda:N.
        checkpoint: which checkpoint of each run, ``best`` (falls back to
            ``last``) or ``last``.
        overwrite: replace an OUT folder that is not empty.
        progress: show progress bars.
        refine: add a ``<run>+reg`` row per run: all CT landmarks projected
            under the robust registration of the landmarks the model found
            (:mod:`pelmark.evaluate.refine`).
        flip_test: predict with the flip test (:func:`pelmark.train.model.flip_test`: the mean of
            the logits of each image and of its mirror image); None (auto) uses it for every run
            whose landmarks have left/right pairs, False gives the paper's single pass, True
            makes a run that cannot mirror an error.
        bootstrap: resamples of the confidence intervals and paired comparisons.
        seed: seed of the resamples (:mod:`pelmark.evaluate.stat_tables`).
        allow_incomplete: evaluate on a store whose synth was interrupted (its finished
            subjects only; a split may be missing); refused otherwise.
    """

    splits: tuple[Split, ...] | None = None
    samples: int = 4
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"
    checkpoint: str = "best"
    overwrite: bool = False
    progress: bool = True
    refine: bool = False
    flip_test: bool | None = None
    bootstrap: int = DEFAULT_RESAMPLES
    seed: int = 0
    allow_incomplete: bool = False

    def __post_init__(self) -> None:
        if self.samples < 0 or self.batch_size < 1 or self.workers < 0:
            raise PelmarkError("need samples >= 0, batch_size >= 1 and workers >= 0")
        if self.bootstrap < 1 or self.seed < 0:
            raise PelmarkError(f"need bootstrap >= 1 and seed >= 0, got {self.bootstrap} and {self.seed}")
        if self.checkpoint not in ("best", "last"):
            raise PelmarkError(f"checkpoint must be best or last, got '{self.checkpoint}'")
        if self.splits is not None and not self.splits:
            raise PelmarkError("no splits were asked for")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["splits"] = None if self.splits is None else [s.label for s in self.splits]
        return values


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """What an evaluation wrote, for the command line to print.

    Attributes:
        out: the results folder.
        splits: the splits evaluated, in table order.
        landmark_names: the store's landmarks (column ``Lk`` is ``landmark_names[k-1]``).
        tables: the Table-1 rows in each unit.
        pose: the rows of ``pose.csv``.
        reference: whether the mean-position rows are present.
        files: every file written, relative to ``out``.
        notes: things a reader of the table should know (runs not complete,
            runs trained on another store, no reference, intervals from
            resampled images, failed registrations of ``+reg`` rows).
        intervals: the rows of ``table1_ci.csv``.
        comparison: the rows of ``comparison.csv``.
        robust: the rows of ``robust.csv``.
        visibility: the rows of ``visibility.csv``.
        classes: the store's bone classes (the ``dice_<class>`` columns); () without labels.
    """

    out: Path
    splits: tuple[str, ...]
    landmark_names: tuple[str, ...]
    tables: dict[Unit, tuple[TableRow, ...]]
    pose: tuple[dict[str, Any], ...]
    reference: bool
    files: tuple[str, ...]
    notes: tuple[str, ...] = ()
    intervals: tuple[dict[str, Any], ...] = ()
    comparison: tuple[dict[str, Any], ...] = ()
    robust: tuple[dict[str, Any], ...] = ()
    visibility: tuple[dict[str, Any], ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def table1(self) -> tuple[TableRow, ...]:
        return self.tables[Unit.MODEL_PX]


def parse_splits(labels: Sequence[str] | None) -> tuple[Split, ...] | None:
    """Split labels from the command line (None or empty: the default)."""
    if not labels:
        return None
    known = {s.label: s for s in Split}
    splits = []
    for label in labels:
        if label not in known:
            raise PelmarkError(f"unknown split '{label}' (known: {', '.join(known)})")
        if known[label] not in splits:
            splits.append(known[label])
    return tuple(splits)


# ---------------------------------------------------------------- validation


def is_eval_folder(path: Path) -> bool:
    """A results folder written by pelmark eval: its marker, or (older ones) a pelmark-eval summary.json."""
    if (path / EVAL_MARKER).is_file():
        return True
    try:
        return json.loads((path / "summary.json").read_text()).get("format") == EVAL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, overwrite: bool, inputs: Sequence[tuple[str, Path]] = ()) -> None:
    """``out`` may be absent, an empty folder, or (with ``overwrite``) an earlier pelmark eval folder.

    Args:
        out: the results folder.
        overwrite: replace an earlier pelmark eval folder.
        inputs: (what, path) of the command's inputs, which ``out`` must not be, hold or lie inside.
    """
    refuse_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise PelmarkError("exists and is not a folder", out)
    if not out.is_dir() or is_empty_folder(out):
        return
    if not is_eval_folder(out):
        raise PelmarkError("holds files that are not pelmark eval results; pick an empty or new --out", out)
    if not overwrite:
        raise PelmarkError("already holds files; pass --overwrite to replace them, or another --out", out)


def choose_splits(group, store: Path, asked: tuple[Split, ...] | None) -> tuple[Split, ...]:
    """The splits to evaluate (see :attr:`EvalSettings.splits`)."""
    present = {s: len(finished_rows(group, s)) for s in Split}
    if asked is not None:
        for split in asked:
            if present[split] == 0:
                raise PelmarkError(f"store has no {split.label} images (from finished subjects) to evaluate", store)
        return asked
    chosen = tuple(s for s in DEFAULT_SPLITS if present[s] > 0)
    if not chosen:
        raise PelmarkError("store has neither novel_view nor novel_subject images; name a split with --split", store)
    return chosen


def load_checked_run(run_dir: Path, landmark_names: tuple[str, ...], checkpoint: str, device) -> TrainedRun:
    """Load one run and check that it predicts the store's landmarks, in the same order.

    Raises:
        PelmarkError: naming the run folder (or the file inside it) for a
            missing or unreadable run, a missing checkpoint, or another landmark set.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PelmarkError("run folder not found", run_dir)
    try:
        run = load_run(run_dir, checkpoint, device)
    except PelmarkError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as error:
        raise PelmarkError(f"cannot load the run ({type(error).__name__}: {error})", run_dir) from None
    if tuple(run.landmark_names) != tuple(landmark_names):
        raise PelmarkError(
            f"run predicts landmarks {list(run.landmark_names)} but the store has {list(landmark_names)}", run_dir
        )
    return run


def load_runs(run_dirs: Sequence[Path], landmark_names: tuple[str, ...], settings: EvalSettings) -> list[TrainedRun]:
    if not run_dirs:
        raise PelmarkError("no run folders given")
    device = resolve_device(settings.device)
    runs, names = [], {}
    for run_dir in run_dirs:
        run = load_checked_run(Path(run_dir), landmark_names, settings.checkpoint, device)
        if run.name == REFERENCE_NAME:
            raise PelmarkError(f"'{REFERENCE_NAME}' names the reference row; rename the run folder", run.run_dir)
        if run.name.endswith(REFINED_SUFFIX):
            raise PelmarkError(f"names ending in '{REFINED_SUFFIX}' are for --refine rows; rename the run folder", run.run_dir)
        if run.name in names:
            raise PelmarkError(f"two runs are named '{run.name}' (table rows are named by folder): {names[run.name]}", run.run_dir)
        names[run.name] = run.run_dir
        runs.append(run)
    return runs


# ---------------------------------------------------------------- evaluation


def evaluate_runs(run_dirs: Sequence[Path], store: Path, out: Path, settings: EvalSettings = EvalSettings()) -> EvalReport:
    """Evaluate runs on ``store`` and write every result into ``out`` (see the module docstring).

    Args:
        run_dirs: run folders written by ``pelmark train``; table rows follow this order.
        store: the synth store to evaluate on.
        out: the results folder (created; replaced only with ``settings.overwrite``).
        settings: splits, figure samples, batch size, device.

    Returns:
        An :class:`EvalReport` with the tables.

    Raises:
        PelmarkError: a run that cannot be loaded or is for other landmarks, a
            store that is not one, is incomplete (without ``allow_incomplete``) or lacks
            a split, an OUT in the way.
    """
    store, out = Path(store), Path(out)
    check_out(out, settings.overwrite, [("the store", store), *(("a run folder", Path(r)) for r in run_dirs)])
    check_complete(store, settings.allow_incomplete)
    group = open_store(store)
    attrs = dict(group.attrs)
    landmark_names = tuple(attrs.get("landmark_names", ()))
    splits = choose_splits(group, store, settings.splits)
    runs = load_runs(run_dirs, landmark_names, settings)
    flips = {run.name: flip_choice(run, settings.flip_test) for run in runs if run.status is not RunStatus.DIV}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / EVAL_MARKER).write_text(json.dumps({"format": EVAL_FORMAT, "version": EVAL_VERSION}) + "\n")
        report = _evaluate(runs, store, group, attrs, landmark_names, splits, staging, settings, flips)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(report, out=out)


def _publish(staging: Path, out: Path) -> None:
    """Put the finished folder at ``out``, replacing what was there only once the new one is complete."""
    if out.exists() and not is_empty_folder(out) and not is_eval_folder(out):
        # Files may have arrived while the runs were evaluated: still never replace them.
        raise PelmarkError("holds files that are not pelmark eval results; pick an empty or new --out", out)
    publish_folder(staging, out)


def _evaluate(
    runs: list[TrainedRun],
    store: Path,
    group,
    attrs: dict[str, Any],
    landmark_names: tuple[str, ...],
    splits: tuple[Split, ...],
    folder: Path,
    settings: EvalSettings,
    flips: dict[str, tuple[tuple[int, ...] | None, str | None]],
) -> EvalReport:
    from tqdm import tqdm

    n_landmarks = len(landmark_names)
    reference = fit_mean_position(store)
    sizes = list(dict.fromkeys(run.config.size for run in runs))
    truths: dict[tuple[Split, int], SplitTruth] = {}

    def truth(split: Split, size: int) -> SplitTruth:
        if (split, size) not in truths:
            truths[split, size] = read_truth(store, split, size)
        return truths[split, size]

    # The first run's size stands for each split in the figures and the visibility counts.
    base = {split: truth(split, sizes[0]) for split in splits}

    # Predictions per split in table order: runs as given, then the reference at each model size.
    # Each item: (split, name, status, predictions or None for a diverged run).
    raw: list[tuple[Split, str, str, Predictions | None]] = []
    for split in splits:
        for run in runs:
            if run.status is RunStatus.DIV:
                raw.append((split, run.name, run.status.value, None))
                continue
            pred = predict_split(
                run, store, truth(split, run.config.size), settings.batch_size, settings.workers, settings.progress, flip=flips[run.name][0]
            )
            raw.append((split, run.name, run.status.value, pred))
        if reference is not None:
            for size in sizes:
                name = REFERENCE_NAME if len(sizes) == 1 else f"{REFERENCE_NAME}@{size}"
                raw.append((split, name, "reference", predict_mean_position(reference, truth(split, size), name)))

    pose_entries = []
    robust: dict[int, PoseErrors] = {}
    jobs = [(pred, registration) for *_, pred in raw if pred is not None for registration in Registration]
    for pred, registration in tqdm(jobs, desc="registration", unit="set", disable=not settings.progress, dynamic_ncols=True):
        errors = pose_metrics(pred, registration)
        pose_entries.append((pred, errors))
        if registration is Registration.ROBUST:
            robust[id(pred)] = errors

    # --refine: each run's <run>+reg row follows its raw row; it reuses the robust registration above.
    ordered, refined_from = [], {}
    for split, name, status, pred in raw:
        ordered.append((split, name, status, pred))
        if settings.refine and pred is not None and pred.peak_probability is not None:
            refinement = refined_from[id(pred)] = refine(pred, robust[id(pred)])
            ordered.append((split, refinement.predictions.model, status, refinement.predictions))
    refinements = list(refined_from.values())
    predictions = [pred for *_, pred in ordered if pred is not None]
    rows: dict[Unit, list[TableRow]] = {unit: [] for unit in Unit}
    for split, name, status, pred in ordered:
        for unit in Unit:
            rows[unit].append(diverged_row(split.label, name) if pred is None else table_row(pred, unit, status))

    files: list[str] = []
    for unit, name in TABLE_FILES.items():
        (folder / name).write_text(table_text(rows[unit], n_landmarks))
        files.append(name)
    write_per_image(folder / "per_image.csv", predictions, list(landmark_names), refinements)
    files.append("per_image.csv")

    pose_rows = _pose_rows(splits, runs, pose_entries)
    write_pose_summary(folder / "pose.csv", pose_rows, SUCCESS_THRESHOLDS_MM)
    write_pose_per_image(folder / "pose_per_image.csv", pose_entries)
    files += ["pose.csv", "pose_per_image.csv"]

    # Statistics in model px: one set of resamples per split, shared by all its rows.
    entries = [Entry(row, pred) for row, (*_, pred) in zip(rows[Unit.MODEL_PX], ordered)]
    draws = {split.label: split_resampling(base[split], settings.bootstrap, settings.seed) for split in splits}
    ci_rows = interval_rows(entries, draws)
    compared = comparison_rows(entries, runs[0].name, draws)
    robust_figures = robust_rows(entries)
    write_rows(folder / CI_FILE, ci_fields(n_landmarks), ci_rows)
    write_rows(folder / COMPARISON_FILE, COMPARISON_FIELDS, compared)
    write_rows(folder / ROBUST_FILE, ROBUST_FIELDS, robust_figures)
    files += [CI_FILE, COMPARISON_FILE, ROBUST_FILE]

    # Visibility: a threshold on each run's score (its peaks, or seg-informed's v̂) chosen on its validation images.
    classes = tuple(attrs.get("classes", ()))
    rules: dict[str, PresenceRule] = {}
    for run in runs:
        if run.status is RunStatus.DIV:
            continue
        rules[run.name] = validation_rule(run, store, settings.batch_size, settings.workers, flips[run.name][0])
    shown_runs = []
    for split, name, status, pred in raw:
        if pred is None or name not in rules:
            continue
        shown_runs.append((pred, rules[name]))
        if id(pred) in refined_from:
            shown_runs.append(registered_presence(pred, rules[name], refined_from[id(pred)]))
    visibility = visibility_rows(shown_runs, group, classes, draws)
    write_visibility(folder / "visibility.csv", visibility, classes)
    files.append("visibility.csv")

    for split in splits:
        # A seg-informed model's figure leaves out the landmarks its presence rule calls absent.
        shown = [
            dataclasses.replace(p, present=presence(p, rules[p.model])) if p.present is not None and p.model in rules else p
            for p in predictions
            if p.truth.split is split
        ]
        write_samples(folder / f"samples_{split.label}.png", group, base[split], shown, settings.samples)
        files.append(f"samples_{split.label}.png")
    labels = [s.label for s in splits]
    write_per_landmark_error(folder / "per_landmark_error.png", rows[Unit.MODEL_PX], labels, n_landmarks)
    write_error_cdf(folder / "error_cdf.png", predictions, labels)
    files += ["per_landmark_error.png", "error_cdf.png"]

    notes = _notes(runs, attrs, reference is not None) + _flip_notes(flips) + _presence_notes(rules) + resampling_notes(draws) + failure_notes(refinements)
    summary = _summary(runs, store, attrs, landmark_names, base, reference, rows, pose_rows, settings)
    summary["statistics"] = statistics_summary(draws, runs[0].name, ci_rows, compared, robust_figures, settings.seed)
    summary["refine"] = refine_summary(refinements, settings.refine)
    summary["flip_test"] = {name: order is not None for name, (order, _) in flips.items()}
    summary["visibility"] = {
        "file": "visibility.csv",
        "classes": list(classes),
        "rules": {name: rule.describe() for name, rule in rules.items()},
        "rows": visibility,
    }
    summary["notes"] = list(notes)
    (folder / "summary.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
    files.append("summary.json")
    return EvalReport(
        out=folder,
        splits=tuple(labels),
        landmark_names=landmark_names,
        tables={unit: tuple(values) for unit, values in rows.items()},
        pose=tuple(pose_rows),
        reference=reference is not None,
        files=tuple(files),
        notes=notes,
        intervals=tuple(ci_rows),
        comparison=tuple(compared),
        robust=tuple(robust_figures),
        visibility=tuple(visibility),
        classes=classes,
    )


def _notes(runs: list[TrainedRun], attrs: dict[str, Any], has_reference: bool) -> tuple[str, ...]:
    notes = []
    for run in runs:
        if run.status is RunStatus.DIV:
            notes.append(f"{run.name}: diverged ({run.info.get('reason') or 'no reason recorded'}); shown as DIV")
        elif run.status is not RunStatus.COMPLETE:
            notes.append(f"{run.name}: run is {run.status.value}, not COMPLETE; its saved checkpoint was evaluated")
        trained_on = run.info.get("store", {}).get("fingerprint")
        if trained_on != attrs.get("fingerprint"):
            notes.append(f"{run.name}: trained on another store (fingerprint {str(trained_on)[:12]})")
    if not has_reference:
        notes.append(f"no {REFERENCE_NAME} rows: the store has no train images")
    return tuple(notes)


def _flip_notes(flips: dict[str, tuple[tuple[int, ...] | None, str | None]]) -> tuple[str, ...]:
    on = [name for name, (order, _) in flips.items() if order is not None]
    notes = [why for _, why in flips.values() if why]
    if on:
        notes.insert(0, f"flip test (each heatmap the mean of the image's and its mirror image's logits): {', '.join(on)}; --no-flip-test for the paper's single pass")
    return tuple(notes)


def _presence_notes(rules: dict[str, PresenceRule]) -> tuple[str, ...]:
    """One note saying what "present" means for each run in the visibility table."""
    if not rules:
        return ()
    return ("visibility, 'present' is: " + "; ".join(f"{name}: {rule.describe()}" for name, rule in rules.items()),)


def _pose_rows(splits: tuple[Split, ...], runs: list[TrainedRun], entries: list) -> list[dict[str, Any]]:
    """``pose.csv`` rows in table order: per split, each run (a diverged one without metrics), then the reference."""
    rows = []
    for split in splits:
        evaluated = {(p.model, e.registration): (p, e) for p, e in entries if p.truth.split is split}
        names = [run.name for run in runs] + sorted({p.model for p, _ in evaluated.values()} - {run.name for run in runs})
        status = {run.name: run.status.value for run in runs}
        for name in names:
            for registration in Registration:
                row: dict[str, Any] = {
                    "split": split.label,
                    "model": name,
                    "registration": registration.value,
                    "status": status.get(name, "reference"),
                }
                if (name, registration) in evaluated:
                    row.update(evaluated[name, registration][1].summary(SUCCESS_THRESHOLDS_MM))
                rows.append(row)
    return rows


def _summary(
    runs: list[TrainedRun],
    store: Path,
    attrs: dict[str, Any],
    landmark_names: tuple[str, ...],
    base: dict[Split, SplitTruth],
    reference: MeanPosition | None,
    rows: dict[Unit, list[TableRow]],
    pose_rows: list[dict[str, Any]],
    settings: EvalSettings,
) -> dict[str, Any]:
    labels = landmark_labels(len(landmark_names))
    split_info = {}
    for split, truth in base.items():
        invisible = ~truth.visible
        split_info[split.label] = {
            "images": truth.n_images,
            "landmarks_visible": int(truth.visible.sum()),
            "landmarks_invisible": int(invisible.sum()),
            "invisible_per_landmark": {label: int(n) for label, n in zip(labels, invisible.sum(0))},
            "subjects": sorted({str(s) for s in truth.subject_ids}),
        }
    if reference is None:
        reference_info = {"available": False, "reason": "the store has no train images to fit the mean positions on"}
    else:
        reference_info = {
            "available": True,
            "name": REFERENCE_NAME,
            "definition": "each landmark's mean visible position over the store's train images, in detector px",
            "train_images": reference.train_images,
            "mean_detector_px": {label: [float(v) for v in p] for label, p in zip(labels, reference.mean_detector_px)},
        }
    run_info = []
    for run in runs:
        trained_on = run.info.get("store", {}).get("fingerprint")
        run_info.append({
            "name": run.name,
            "run_dir": str(run.run_dir.resolve()),
            "status": run.status.value,
            "reason": run.info.get("reason", ""),
            "evaluated": run.status is not RunStatus.DIV,
            "strategy": run.config.strategy.value,
            "size": run.config.size,
            "steps": run.info.get("steps"),
            "trained_on_store": trained_on,
            "same_store": trained_on == attrs.get("fingerprint"),
        })  # fmt: skip
    return {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "created": now_utc(),
        "store": {
            "path": str(store.resolve()),
            "fingerprint": attrs.get("fingerprint"),
            "complete": attrs.get("complete"),
        },
        "landmarks": dict(zip(labels, landmark_names)),
        "prediction": "argmax of each landmark's heatmap at the model's resolution (as the paper)",
        "metric": "RMSE_l = sqrt(mean over images where landmark l is visible of d^2); Mean = mean of the RMSE_l",
        "units": {unit.value: UNIT_NOTES[unit] for unit in Unit},
        "tables": {unit.value: {"file": TABLE_FILES[unit], "rows": [r.to_dict(labels) for r in rows[unit]]} for unit in Unit},
        "splits": split_info,
        "runs": run_info,
        "reference": reference_info,
        "pose": {
            "thresholds_mm": list(SUCCESS_THRESHOLDS_MM),
            "success": "mTRE below the threshold and a registration that is not degenerate, over all images",
            "errors": "means and medians over the images whose registration is not degenerate",
            "registrations": {"lm": "register(..., solver='lm') on the visible landmarks", "robust": "register_robust (RANSAC, then lm on the inliers) on the landmarks the model found"},
            "rows": pose_rows,
        },
        "settings": settings.to_dict(),
        "versions": package_versions(),
        "git_revision": git_revision(),
    }


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value

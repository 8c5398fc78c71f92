"""Visibility and segmentation metrics of ``pelmark eval`` (``visibility.csv``): does a model know which landmarks are there?

At the paper's ±45° / ±50 mm poses some landmarks (the ASIS most often) leave
a 30 cm detector, and a model that always puts every landmark somewhere
makes false landmarks. For every model and split:

present
    Every model's "present" call is a threshold on a score of its own, chosen
    on the run's own validation images (the train-split images the run held
    out, by its ``val_fraction`` and ``seed``): the threshold with the best
    visibility accuracy there (the lowest such, on a tie). A store without
    those images falls back to 0.5. The score of a model without a visibility
    output is the sigmoid of its heatmap's peak. The score of a
    segmentation-informed model is seed 003's v̂ ∈ {0, 0.5, 1} (see
    :mod:`pelmark.train.seg_informed`), so its threshold says which of the
    paper's levels means "present": 0.5 (v̂ > 0, the paper's false-positive
    rule, and the fallback) or 1 (found *and* on one of its own bones; a
    peak off its bone, v̂ = 0.5, is the model's own flag of an inconsistent
    detection, and ``--refine`` already leaves those out of its vote).
    The same search also moves the image edge that v̂'s "found" tests, by
    d px (-16 to 0, and up to the canvas margin's width outwards for a model
    with one: :func:`choose_border`), since near the border the argmax is
    only good to a few pixels. On the demo cohort the gain is small: +0.28
    points of novel-subject accuracy over six margin runs and +0.13 over three
    plain ones, no run's interval below 0, and −0.16 and +0.16 on novel views
    (README, *Results*, round 9). ``d = 0`` is the paper's "in the image".
    A ``<run>+reg`` row (``pelmark eval --refine``) calls a landmark present
    where the robust pose of the run's found landmarks projects its CT
    landmark into the image: the anatomy, not the heatmap, says what is in the
    field of view, which is what "visible" means here. An image whose
    registration failed or is unconfirmed keeps the run's own calls.
accuracy, precision, recall
    Over every (image, landmark) pair: accuracy of "present" against the truth
    (the landmark on the model's image), with its 95 % interval over the
    split's resampled subjects (the resamples of Table 1's intervals), and
    precision and recall of "present".
rmse_both_present_px
    Table 1's Mean (the mean over landmarks of each landmark's RMSE, model px),
    over only the pairs that are both truly and predictedly present.
dice_<class>
    For a model with a segmentation output: Dice of each bone class against the
    store's label maps (resized to the model's size by nearest neighbour, as in
    training), pooled over the split's images.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pelmark.evaluate.predict import Predictions, SplitTruth
from pelmark.evaluate.stats import Resampling, bootstrap_proportion
from pelmark.train.seg_informed import PRESENT_PROBABILITY

# The threshold of a model without a visibility output when the store has no validation images of its run.
FALLBACK_THRESHOLD = 0.5
# How far (model px) the search of a v̂ rule moves the image edge inwards, and at most outwards (a canvas margin
# bounds it there): the demo's localisation near the border is a few px (README, *Results*, round 9).
BORDER_REACH_PX = 16


class Score(str, enum.Enum):
    """What a presence threshold applies to."""

    PEAK = "peak sigmoid"  # the sigmoid of the heatmap's largest logit
    VISIBILITY = "v̂"  # a segmentation-informed model's seed-003 visibility, in {0, 0.5, 1}


@dataclasses.dataclass(frozen=True)
class PresenceRule:
    """How a model's "present" calls are made: given with its predictions (``own``), or a threshold on a score.

    ``border_px`` (v̂ only) moves the image's edge for v̂'s "found": out by that many px when positive (an
    argmax up to ``border_px`` px outside the image, in a canvas margin, counts as found), in when negative.
    """

    own: bool
    threshold: float | None = None
    source: str = ""
    score: Score = Score.PEAK
    border_px: int = 0

    def describe(self) -> str:
        if self.own:
            return self.source or "model's visibility output"
        border = f", image edge moved {self.border_px:+d} px" if self.border_px else ""
        return f"{self.score.value} >= {self.threshold:.4g}{border} ({self.source})"


REGISTERED_PRESENCE = "registered CT landmark inside the image (the run's rule where the registration failed or is unconfirmed)"


def registered_presence(raw: Predictions, rule: PresenceRule, refinement) -> tuple[Predictions, PresenceRule]:
    """The ``<run>+reg`` predictor with its "present" calls: its projection lies in the image (see the module docstring).

    ``refinement`` is the :class:`~pelmark.evaluate.refine.Refinement` of ``raw``.
    """
    present = np.where(refinement.kept_raw[:, None], presence(raw, rule), ~refinement.outside)
    return dataclasses.replace(refinement.predictions, present=present), PresenceRule(own=True, source=REGISTERED_PRESENCE)


def choose_threshold(peak_probability: np.ndarray, visible: np.ndarray) -> float:
    """The threshold t with the best accuracy of ``peak >= t`` against ``visible`` (the lowest such t).

    The candidates are every peak value and 1 + ε (nothing present), so the best
    split of the sorted peaks is found exactly.
    """
    peaks = np.asarray(peak_probability, dtype=np.float64).ravel()
    truth = np.asarray(visible, dtype=bool).ravel()
    if peaks.size == 0:
        return FALLBACK_THRESHOLD
    candidates = np.append(np.unique(peaks), np.nextafter(1.0, 2.0))
    order = np.argsort(peaks)
    sorted_peaks, sorted_truth = peaks[order], truth[order]
    # Below candidate t: the pairs with peak < t are called absent.
    below = np.searchsorted(sorted_peaks, candidates, side="left")
    absent_below = np.concatenate([[0], np.cumsum(~sorted_truth)])[below]
    present_from = truth.sum() - np.concatenate([[0], np.cumsum(sorted_truth)])[below]
    correct = absent_below + present_from
    return float(candidates[int(np.argmax(correct))])


def validation_truth(run, store: Path):
    """The ground truth of ``run``'s validation images (the train-split images it held out, by its
    ``val_fraction`` and ``seed``), or None when the store has none of them."""
    from pelmark.evaluate.predict import read_truth
    from pelmark.store import Split, StoreReader
    from pelmark.train.loop import split_validation

    rows = StoreReader(store).rows(Split.TRAIN)
    if len(rows) < 2 or run.config.val_fraction <= 0:
        return None
    _, val_rows = split_validation(rows, run.config.val_fraction, run.config.seed)
    truth = read_truth(store, Split.TRAIN, run.config.size)
    keep = np.isin(truth.rows, val_rows)
    return dataclasses.replace(
        truth,
        rows=truth.rows[keep],
        subject_ids=truth.subject_ids[keep],
        true_px=truth.true_px[keep],
        visible=truth.visible[keep],
        poses=truth.poses[keep],
        landmarks_3d=truth.landmarks_3d[keep],
    )


def validation_rule(run, store: Path, batch_size: int, workers: int, flip: tuple[int, ...] | None = None) -> PresenceRule:
    """The presence rule of a run: a threshold on its score (the peak's sigmoid, or v̂ for a model with a
    visibility output), chosen on its validation images (predicted as eval predicts the run: ``flip`` is its
    flip-test order, or None for one pass); for v̂, the image edge too (:func:`choose_border`)."""
    from pelmark.evaluate.predict import predict_split, run_classes

    score = Score.VISIBILITY if run_classes(run) else Score.PEAK
    subset = validation_truth(run, store)
    if subset is None:
        return PresenceRule(own=False, threshold=FALLBACK_THRESHOLD, source="no validation images: fixed", score=score)
    pred = predict_split(run, store, subset, batch_size, workers, progress=False, flip=flip)
    source = f"chosen on {subset.n_images} validation images"
    if score is Score.VISIBILITY:
        threshold, border = choose_border(pred, int(run.config.canvas_margin_px or 0))
        return PresenceRule(own=False, threshold=threshold, source=source, score=score, border_px=border)
    return PresenceRule(own=False, threshold=choose_threshold(score_of(pred, score), subset.visible), source=source, score=score)


def choose_border(pred: Predictions, margin_px: int, reach_px: int = BORDER_REACH_PX) -> tuple[float, int]:
    """(v̂ threshold, edge move d) with the best accuracy on ``pred``'s images: at each d in -reach..margin px
    (``margin_px`` a canvas margin's width; the argmax cannot lie further out), the threshold of
    :func:`choose_threshold` on :func:`bordered_visibility`; on a tie the smallest |d|, then the smaller d."""
    best = None
    for border in range(-reach_px, min(reach_px, margin_px) + 1):
        values = bordered_visibility(pred, border)
        threshold = choose_threshold(values, pred.truth.visible)
        correct = int(((values >= threshold) == pred.truth.visible).sum())
        key = (-correct, abs(border), border)
        if best is None or key < best[0]:
            best = (key, threshold, border)
    return best[1], best[2]


def bordered_visibility(pred: Predictions, border_px: int) -> np.ndarray:
    """(N, L) v̂ with the image's edge moved by ``border_px`` (see :class:`PresenceRule`): a landmark is found when
    its peak's sigmoid reaches 0.5 and its argmax lies at most ``border_px`` px outside the image (at least
    ``-border_px`` px inside it); found, it is 1 on one of its bones, 0.5 off them. At 0 this is ``pred.visibility``.

    Raises:
        ValueError: ``pred`` has no v̂, or (for a move) no on-bone calls of its argmax.
    """
    if pred.visibility is None:
        raise ValueError(f"{pred.model} has no {Score.VISIBILITY.value} to threshold")
    if border_px == 0:
        return np.asarray(pred.visibility)
    if pred.on_bone is None or pred.peak_probability is None:
        raise ValueError(f"{pred.model} has no on-bone calls of its argmax to move the image edge by")
    found = (pred.peak_probability >= PRESENT_PROBABILITY) & (pred.edge_distance() >= -border_px)
    return np.where(found, np.where(pred.on_bone, 1.0, 0.5), 0.0).astype(np.asarray(pred.visibility).dtype)


def score_of(pred: Predictions, score: Score, border_px: int = 0) -> np.ndarray:
    """(N, L) the values that ``score`` thresholds (v̂ with the image edge moved by ``border_px``).

    Raises:
        ValueError: ``pred`` has no such values (v̂ of a model without a visibility output).
    """
    if score is Score.VISIBILITY:
        return bordered_visibility(pred, border_px)
    if pred.peak_probability is None:
        raise ValueError(f"{pred.model} has no {score.value} to threshold")
    return np.asarray(pred.peak_probability)


def presence(pred: Predictions, rule: PresenceRule) -> np.ndarray:
    """(N, L) the predicted "present" calls of ``pred`` under ``rule``."""
    if rule.own:
        return np.asarray(pred.present, dtype=bool)
    return score_of(pred, rule.score, rule.border_px) >= rule.threshold


def visibility_metrics(pred: Predictions, present: np.ndarray, draws: Resampling | None = None) -> dict[str, float]:
    """Accuracy (with its interval over ``draws``, the split's resamples), precision and recall of ``present``
    against the truth, and the RMSE over both-present pairs."""
    truth = pred.truth.visible
    tp = int((present & truth).sum())
    fp = int((present & ~truth).sum())
    fn = int((~present & truth).sum())
    both = present & truth
    distance2 = np.square(pred.predicted_px - pred.truth.true_px).sum(-1)
    per_landmark = [np.sqrt(distance2[both[:, l], l].mean()) for l in range(truth.shape[1]) if both[:, l].any()]
    accuracy = bootstrap_proportion(present == truth, draws) if draws is not None else None
    return {
        "accuracy": float((present == truth).mean()),
        "accuracy_lo": accuracy.lo if accuracy is not None else float("nan"),
        "accuracy_hi": accuracy.hi if accuracy is not None else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "true_present": int(truth.sum()),
        "predicted_present": int(present.sum()),
        "rmse_both_present_px": float(np.mean(per_landmark)) if per_landmark else float("nan"),
        "n_both_present": int(both.sum()),
    }


def true_labels(group, truth: SplitTruth) -> np.ndarray | None:
    """(N, S, S) the store's label maps of ``truth``'s images at model size (nearest at pixel centres); None without labels."""
    if "segmentation" not in group:
        return None
    size = truth.size
    labels = torch.from_numpy(np.stack([np.asarray(group["segmentation"][int(row)]) for row in truth.rows]))
    if labels.shape[-2:] != (size, size):
        labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
    return labels.to(torch.uint8).numpy()


def dice_per_class(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> list[float]:
    """Dice of classes 1..n pooled over images: 2|P ∩ T| / (|P| + |T|), NaN where both are empty."""
    scores = []
    for k in range(1, n_classes + 1):
        p, t = predicted == k, labels == k
        total = int(p.sum()) + int(t.sum())
        scores.append(2.0 * int((p & t).sum()) / total if total else float("nan"))
    return scores


def visibility_fields(classes: tuple[str, ...]) -> tuple[str, ...]:
    return (
        "split", "model", "presence", "accuracy", "accuracy_lo", "accuracy_hi", "precision", "recall", "true_present", "predicted_present",
        "rmse_both_present_px", "n_both_present", *(f"dice_{c}" for c in classes),
    )  # fmt: skip


def visibility_rows(
    entries: list[tuple[Predictions, PresenceRule]], group, classes: tuple[str, ...], draws: dict[str, Resampling] | None = None
) -> list[dict[str, Any]]:
    """One row per (prediction, rule): the metrics of the module docstring (``draws``: each split's resamples, by label)."""
    labels: dict[tuple[str, int], np.ndarray | None] = {}
    rows = []
    for pred, rule in entries:
        row: dict[str, Any] = {"split": pred.truth.split.label, "model": pred.model, "presence": rule.describe()}
        row.update(visibility_metrics(pred, presence(pred, rule), (draws or {}).get(pred.truth.split.label)))
        if pred.segmentation is not None and classes:
            key = (pred.truth.split.label, pred.truth.size)
            if key not in labels:
                labels[key] = true_labels(group, pred.truth)
            if labels[key] is not None:
                row.update({f"dice_{c}": d for c, d in zip(classes, dice_per_class(pred.segmentation, labels[key], len(classes)))})
        rows.append(row)
    return rows


def write_visibility(path: Path, rows: list[dict[str, Any]], classes: tuple[str, ...]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, visibility_fields(classes), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def visibility_text(rows: list[dict[str, Any]], classes: tuple[str, ...]) -> str:
    """The rows as an aligned table for the terminal (accuracy, precision, recall in %, RMSE in model px, Dice)."""
    header = ["split", "model", "vis.acc", "95% CI", "prec", "recall", "RMSE both", *(f"Dice {c}" for c in classes)]
    lines = [header]
    for row in rows:
        cells = [row["split"], row["model"]]
        cells.append(_pct(row.get("accuracy")))
        low, high = _pct(row.get("accuracy_lo")), _pct(row.get("accuracy_hi"))
        cells.append(f"[{low}, {high}]" if low and high else "")
        cells += [_pct(row.get(k)) for k in ("precision", "recall")]
        cells.append(_num(row.get("rmse_both_present_px")))
        cells += [_num(row.get(f"dice_{c}"), 3) for c in classes]
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def _pct(value: Any) -> str:
    return "" if value is None or not np.isfinite(value) else f"{100.0 * value:.1f}"


def _num(value: Any, digits: int = 2) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

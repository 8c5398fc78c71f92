"""Which of seed 003's v̂ levels should mean "present", and where do the visibility calls go wrong?

    python experiments/visibility_rule.py STORE RUN_DIR... [--split novel_subject --split novel_view]

A measurement, not a feature: the evidence behind ``pelmark eval``'s presence
rule for a segmentation-informed run (v̂ thresholded at the level chosen on the
run's validation images, :func:`pelmark.evaluate.visibility.validation_rule`).
Each run predicts through eval's own code, with eval's default flip test. For
every split it prints:

* how often a landmark at each v̂ level (0 not found, 0.5 found off its bone,
  1 found on it) is truly in the image;
* the accuracy of the paper's rule (v̂ > 0) and of the validation-chosen one,
  their paired difference with a 95 % interval and two-sided p over the split's
  resampled subjects (eval's resamples: 2000 draws, seed 0);
* the errors of the chosen rule by the true landmark's signed distance to the
  image border (model px, negative outside): where they are;
* what an ideal point predictor that may place a landmark outside the image
  would score with Gaussian position noise of 2, 4 and 6 px (one fixed draw,
  seed 0): the accuracy that a model's localisation near the border allows.

Two alternatives that ``pelmark eval`` does not ship, for the record:

* the smooth visibility that training uses, ``p (1 + q) / 2``
  (:func:`pelmark.train.seg_informed.soft_visibility`), thresholded at the
  level chosen on the same validation images;
* the same model on inputs zero-padded by 16 px on each side, a landmark
  present when v̂ = 1 and its argmax lies inside the image: can a model
  trained without a margin place an absent landmark in one? With the
  Table-1 mean of its argmax (model px).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pelmark.evaluate.predict import Predictions, flip_choice, predict_split, read_truth, run_classes
from pelmark.evaluate.stat_tables import split_resampling
from pelmark.evaluate.stats import bootstrap_p_value, mean_over_landmarks, percentile_interval, resampled_mean
from pelmark.evaluate.tables import rmse_per_landmark
from pelmark.evaluate.units import Unit
from pelmark.evaluate.visibility import choose_threshold, presence, validation_rule, validation_truth
from pelmark.geometry import grid_edge_distance
from pelmark.landmark_sets import landmark_bone_matrix
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from pelmark.train.data import DataSettings, StoreDataset
from pelmark.train.model import flip_test
from pelmark.train.seg_informed import canvas_margin, discrete_visibility, image_argmax, soft_visibility, split_outputs

BORDER_BANDS_PX = (-np.inf, -10.0, -3.0, 0.0, 3.0, 10.0, np.inf)
NOISE_PX = (2.0, 4.0, 6.0)
PAD_PX = 16


@torch.no_grad()
def unshipped_scores(run, store: Path, truth, order, pad_px: int | None) -> tuple[np.ndarray, Predictions | None]:
    """(N, L) the smooth visibility p (1 + q) / 2 of ``truth``'s images, and the predictions (argmax in
    model px, v̂) of the same model on those images zero-padded by ``pad_px`` (None: not run), flip test as eval."""
    n = truth.true_px.shape[1]
    bones = torch.tensor(landmark_bone_matrix(run.landmark_names, run_classes(run)))
    dataset = StoreDataset(store, DataSettings(size=run.config.size, splits=(truth.split,), targets=False), indices=truth.rows)
    smooth, padded_px, padded_v = [], [], []
    for batch in DataLoader(dataset, batch_size=16):
        passes = [(0, batch["image"])]
        if pad_px is not None:
            passes.append((pad_px, torch.nn.functional.pad(batch["image"], (pad_px,) * 4, value=0.0)))
        for pad, images in passes:
            outputs = flip_test(lambda x: run.model(x).float(), images, order)
            margin = canvas_margin(outputs, images.shape)
            heatmaps, segmentation = split_outputs(outputs, n, margin)
            if pad == 0:
                smooth.append(soft_visibility(heatmaps, segmentation, bones).numpy())
            else:
                padded_px.append(image_argmax(heatmaps, margin).numpy().astype(np.float64) - pad)
                padded_v.append(discrete_visibility(heatmaps, segmentation, bones).numpy())
    if pad_px is None:
        return np.concatenate(smooth), None
    return np.concatenate(smooth), Predictions(f"{run.name} padded", truth, np.concatenate(padded_px), visibility=np.concatenate(padded_v))


def paired_accuracy(first: np.ndarray, second: np.ndarray, truth: np.ndarray, draws) -> tuple[float, float, float, float]:
    """(difference of accuracy second - first, its interval low, high, p) over the resampled subjects."""
    gain, resampled = resampled_mean((second == truth).astype(float) - (first == truth), draws)
    interval = percentile_interval(gain, resampled)
    return interval.value, interval.lo, interval.hi, bootstrap_p_value(resampled)


def border_distance_px(points_px: np.ndarray, size: int) -> np.ndarray:
    """(N, L) signed distance of each point to the border of a size x size image (pixel edges at -0.5, size - 0.5)."""
    return grid_edge_distance(torch.from_numpy(np.asarray(points_px, dtype=np.float64)), size, size).numpy()


def errors_by_border(wrong: np.ndarray, truth) -> str:
    """``wrong`` (N, L) counted in the bands of the true landmarks' distance to the border: "[low, high): errors/pairs"."""
    distance = border_distance_px(truth.true_px, truth.size)
    bands = []
    for low, high in zip(BORDER_BANDS_PX[:-1], BORDER_BANDS_PX[1:]):
        band = (distance >= low) & (distance < high)
        bands.append(f"[{low:g}, {high:g}): {int(wrong[band].sum())}/{int(band.sum())}")
    return "  ".join(bands)


def runs_and_splits(doc: str) -> tuple[argparse.Namespace, list[Split]]:
    """The command line ``STORE RUN_DIR... [--split ...]`` of the experiments on runs: (args, the splits, both test splits by default)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", action="append", choices=[s.label for s in (Split.NOVEL_VIEW, Split.NOVEL_SUBJECT)])
    args = parser.parse_args()
    return args, [Split[label.upper()] for label in (args.split or ["novel_subject", "novel_view"])]


def accuracy_cell(name: str, present: np.ndarray, visible: np.ndarray) -> str:
    """``NAME accuracy % (precision, recall)`` of the ``present`` calls against ``visible``."""
    precision = (present & visible).sum() / max(1, present.sum())
    recall = (present & visible).sum() / max(1, visible.sum())
    return f"{name} {100 * (present == visible).mean():.2f} % (precision {100 * precision:.1f}, recall {100 * recall:.1f})"


def main() -> None:
    args, splits = runs_and_splits(__doc__)
    rng = np.random.default_rng(0)
    for run_dir in args.runs:
        run = load_run(run_dir)
        order, _ = flip_choice(run, None)
        rule = validation_rule(run, args.store, 16, 0, order)
        val = validation_truth(run, args.store)
        smooth_threshold = choose_threshold(unshipped_scores(run, args.store, val, order, None)[0], val.visible)
        print(f"{run.name}: presence rule {rule.describe()}; smooth visibility >= {smooth_threshold:.4g} on the same images")
        for split in splits:
            truth = read_truth(args.store, split, run.config.size)
            pred = predict_split(run, args.store, truth, progress=False, flip=order)
            visible = truth.visible
            if pred.visibility is None:
                raise SystemExit(f"{run_dir}: not a segmentation-informed run (no v̂)")
            levels = "  ".join(
                f"v̂ = {level:g}: {int((pred.visibility == level).sum())} pairs, {100 * visible[pred.visibility == level].mean():.0f} % in the image"
                for level in (0.0, 0.5, 1.0)
                if (pred.visibility == level).any()
            )
            paper = pred.visibility > 0
            chosen = presence(pred, rule)
            draws = split_resampling(truth, 2000, 0)
            diff, lo, hi, p = paired_accuracy(paper, chosen, visible, draws)
            print(f"  {split.label}: {levels}")
            print(
                f"    accuracy: paper's v̂ > 0 {100 * (paper == visible).mean():.2f} %, chosen rule {100 * (chosen == visible).mean():.2f} %,"
                f" difference {100 * diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}], p {p:.3g}"
            )
            print(f"    chosen rule's errors by distance to the border (px): {errors_by_border(chosen != visible, truth)}")
            ideal = []
            for noise in NOISE_PX:
                noisy = truth.true_px + rng.normal(0.0, noise, truth.true_px.shape)
                ideal.append(f"{noise:g} px {100 * ((border_distance_px(noisy, truth.size) >= 0) == visible).mean():.1f} %")
            print(f"    an ideal point predictor, inside or outside the image, with noise of {', '.join(ideal)}")
            smooth, padded = unshipped_scores(run, args.store, truth, order, PAD_PX)
            inside = border_distance_px(padded.predicted_px, truth.size) >= 0
            padded_present = inside & (padded.visibility == 1)
            print(
                f"    not shipped: smooth visibility {100 * ((smooth >= smooth_threshold) == visible).mean():.2f} %;"
                f" inputs padded by {PAD_PX} px {100 * (padded_present == visible).mean():.2f} %"
                f" ({int((~inside).sum())} argmaxes outside the image, {int((~inside & ~visible).sum())} of them truly absent),"
                f" Table-1 mean {mean_over_landmarks(rmse_per_landmark(padded, Unit.MODEL_PX)):.2f} px against {mean_over_landmarks(rmse_per_landmark(pred, Unit.MODEL_PX)):.2f}"
            )


if __name__ == "__main__":
    main()

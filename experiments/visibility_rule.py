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
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pelmark.evaluate.predict import flip_choice, predict_split, read_truth
from pelmark.evaluate.stat_tables import split_resampling
from pelmark.evaluate.stats import bootstrap_p_value, percentile_interval, resampled_mean
from pelmark.evaluate.visibility import presence, validation_rule
from pelmark.store import Split
from pelmark.train.checkpoint import load_run

BORDER_BANDS_PX = (-np.inf, -10.0, -3.0, 0.0, 3.0, 10.0, np.inf)
NOISE_PX = (2.0, 4.0, 6.0)


def paired_accuracy(first: np.ndarray, second: np.ndarray, truth: np.ndarray, draws) -> tuple[float, float, float, float]:
    """(difference of accuracy second - first, its interval low, high, p) over the resampled subjects."""
    gain, resampled = resampled_mean((second == truth).astype(float) - (first == truth), draws)
    interval = percentile_interval(gain, resampled)
    return interval.value, interval.lo, interval.hi, bootstrap_p_value(resampled)


def border_distance_px(points_px: np.ndarray, size: int) -> np.ndarray:
    """(N, L) signed distance of each point to the border of a size x size image (pixel edges at -0.5, size - 0.5)."""
    x, y = points_px[..., 0], points_px[..., 1]
    return np.minimum.reduce([x + 0.5, size - 0.5 - x, y + 0.5, size - 0.5 - y])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", action="append", choices=[s.label for s in (Split.NOVEL_VIEW, Split.NOVEL_SUBJECT)])
    args = parser.parse_args()
    splits = [Split[label.upper()] for label in (args.split or ["novel_subject", "novel_view"])]
    rng = np.random.default_rng(0)
    for run_dir in args.runs:
        run = load_run(run_dir)
        order, _ = flip_choice(run, None)
        rule = validation_rule(run, args.store, 16, 0, order)
        print(f"{run.name}: presence rule {rule.describe()}")
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
            distance = border_distance_px(truth.true_px, truth.size)
            wrong = chosen != visible
            bands = []
            for low, high in zip(BORDER_BANDS_PX[:-1], BORDER_BANDS_PX[1:]):
                band = (distance >= low) & (distance < high)
                bands.append(f"[{low:g}, {high:g}): {int(wrong[band].sum())}/{int(band.sum())}")
            print(f"    chosen rule's errors by distance to the border (px): {'  '.join(bands)}")
            ideal = []
            for noise in NOISE_PX:
                noisy = truth.true_px + rng.normal(0.0, noise, truth.true_px.shape)
                ideal.append(f"{noise:g} px {100 * ((border_distance_px(noisy, truth.size) >= 0) == visible).mean():.1f} %")
            print(f"    an ideal point predictor, inside or outside the image, with noise of {', '.join(ideal)}")


if __name__ == "__main__":
    main()

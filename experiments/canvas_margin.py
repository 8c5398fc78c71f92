"""Does a canvas margin help the seg-informed model? Paired, on the same images, run against run.

    python experiments/canvas_margin.py STORE --pair PLAIN_RUN MARGIN_RUN [--pair ...]

A measurement, not a feature: the evidence behind the README's round 7. Each
pair is two seg-informed runs that differ only by ``canvas_margin_px`` (same
seed, same settings). Both predict through ``pelmark eval``'s own code with its
default flip test and its presence rule (v̂ thresholded at the level chosen on
each run's validation images). For every pair and split it prints:

* each run's visibility accuracy, and their paired difference with a 95 %
  interval and two-sided p over the split's resampled subjects (eval's
  resamples: 2000 draws, seed 0);
* each run's precision and recall of "present";
* each run's Table-1 mean (argmax RMSE, model px) and their paired difference,
  as ``pelmark eval`` computes it for its comparison table;
* each run's errors by the true landmark's signed distance to the image
  border (model px, negative outside), in the bands of
  ``experiments/visibility_rule.py``;
* each run's errors by cause: a landmark in the image called absent because
  its heatmap peaks outside the image (in the margin), because its peak is
  below the presence probability, or because it peaks off its own bones
  (v̂ = 0.5 under a rule that asks for v̂ = 1); and a landmark outside the
  image called present.

Then, over the pairs, the mean accuracy of each run and how many pairs the
margin won.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pelmark.evaluate.predict import flip_choice, predict_split, read_truth
from pelmark.evaluate.stat_tables import split_resampling, squared_errors_px
from pelmark.evaluate.stats import paired_difference
from pelmark.evaluate.visibility import presence, validation_rule
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from visibility_rule import accuracy_cell, errors_by_border, paired_accuracy

RESAMPLES = 2000


def predictions(run_dir: Path, store: Path, split: Split):
    """(run, eval's predictions on ``split``, eval's present calls, the rule's description)."""
    run = load_run(run_dir)
    order, _ = flip_choice(run, None)
    rule = validation_rule(run, store, 16, 0, order)
    truth = read_truth(store, split, run.config.size)
    pred = predict_split(run, store, truth, progress=False, flip=order)
    return run, pred, presence(pred, rule), rule.describe()


def errors_by_cause(pred, present: np.ndarray) -> str:
    """The wrong calls of ``present`` by their cause, read off the model's v̂ and argmax."""
    visible = pred.truth.visible
    missed = visible & ~present
    inside = pred.inside()
    v = pred.visibility
    causes = {
        "missed, peak outside the image": missed & (v == 0) & ~inside,
        "missed, peak too low": missed & (v == 0) & inside,
        "missed, peak off its bones": missed & (v == 0.5),
        "missed, other": missed & (v == 1),
        "outside, called present": ~visible & present,
    }
    return "  ".join(f"{name}: {int(mask.sum())}" for name, mask in causes.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--pair", nargs=2, type=Path, action="append", required=True, metavar=("PLAIN", "MARGIN"))
    parser.add_argument("--split", action="append", choices=[s.label for s in (Split.NOVEL_VIEW, Split.NOVEL_SUBJECT)])
    args = parser.parse_args()
    splits = [Split[label.upper()] for label in (args.split or ["novel_subject", "novel_view"])]
    totals: dict[str, list[tuple[float, float, float, float]]] = {s.label: [] for s in splits}
    for plain_dir, margin_dir in args.pair:
        for split in splits:
            plain_run, plain, plain_present, plain_rule = predictions(plain_dir, args.store, split)
            margin_run, margin, margin_present, margin_rule = predictions(margin_dir, args.store, split)
            truth = plain.truth
            if not np.array_equal(truth.rows, margin.truth.rows):
                raise SystemExit(f"{plain_dir} and {margin_dir} predict different images")
            visible = truth.visible
            draws = split_resampling(truth, RESAMPLES, 0)
            diff, lo, hi, p = paired_accuracy(plain_present, margin_present, visible, draws)
            rmse = paired_difference(squared_errors_px(plain), squared_errors_px(margin), draws)
            print(f"{plain_dir} -> {margin_dir} ({margin_run.config.canvas_margin_px} px margin), {split.label}:")
            print(f"  presence rules: {plain_rule} | {margin_rule}")
            cells = [accuracy_cell(name, present, visible) for name, present in (("plain", plain_present), ("margin", margin_present))]
            print(f"  visibility accuracy: {'; '.join(cells)}; difference {100 * diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}], p {p:.3g}")
            print(
                f"  Table-1 mean: plain {rmse.baseline_mean:.2f}, margin {rmse.other_mean:.2f} px; difference {rmse.difference.value:+.2f}"
                f" [{rmse.difference.lo:+.2f}, {rmse.difference.hi:+.2f}] ({rmse.relative_pct:+.1f} %), p {rmse.p_value:.3g}"
            )
            for name, present in (("plain", plain_present), ("margin", margin_present)):
                print(f"  {name} errors by distance to the border (px): {errors_by_border(present != visible, truth)}")
            for name, pred, present in (("plain", plain, plain_present), ("margin", margin, margin_present)):
                print(f"  {name} errors by cause: {errors_by_cause(pred, present)}")
            totals[split.label].append(
                ((plain_present == visible).mean(), (margin_present == visible).mean(), rmse.baseline_mean, rmse.other_mean)
            )
    for label, rows in totals.items():
        values = np.asarray(rows)
        wins = int((values[:, 1] > values[:, 0]).sum())
        print(
            f"{label}, {len(rows)} pairs: accuracy plain {100 * values[:, 0].mean():.2f} %, margin {100 * values[:, 1].mean():.2f} %"
            f" (margin ahead in {wins}); Table-1 mean plain {values[:, 2].mean():.2f}, margin {values[:, 3].mean():.2f} px"
        )


if __name__ == "__main__":
    main()

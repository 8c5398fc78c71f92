"""Should a seg-informed run's "present" call move its image border by a few pixels, chosen on its validation images?

    python experiments/border_tolerance.py STORE RUN_DIR... [--split novel_subject --split novel_view]

A measurement, not a feature: the README's round 9. Round 8 found that every
miss of a canvas-margin model is a peak just outside the image and that misses
outnumber false "present" calls about 3 to 1: a landmark near the border is
localised to a few pixels, so "its argmax lies in the image" is a noisy
decision there. ``pelmark eval`` already chooses one part of the presence rule
on each run's validation images (which v̂ level means present,
:func:`pelmark.evaluate.visibility.validation_rule`). This script chooses the
border too, on the same images, by the same criterion, and asks whether the
choice carries over to the test splits.

The rule (fixed before any run of this script):

* A landmark is present when its peak's sigmoid reaches 0.5 (as eval's v̂),
  its argmax lies at a signed distance of at least ``0.5 - d`` px from the
  image border (pixel edges at -0.5 and S - 0.5, negative outside; d = 0 is
  eval's "in the image"), and its v̂ reaches the level ``t`` (1: the argmax
  pixel, clamped into the image, is of its bones; 0.5: any).
* ``(t, d)`` is chosen on the run's validation images (eval's, flip test as
  eval): the best accuracy; on a tie the smallest ``|d|``, then the smaller d,
  then the lower t (at each d, t is eval's own choice of level on those
  images, :func:`pelmark.evaluate.visibility.choose_threshold`, so that
  d = 0 is eval's rule exactly). d ranges over -16..16 px for a run with a canvas margin
  (its argmax may lie up to the margin outside) and -16..0 for a plain run
  (whose argmax cannot leave the image, but may sit on its edge rows).
* The chosen rule is compared with eval's current one (the same search at
  d = 0, which must reproduce eval's calls: the script checks it) on each
  test split: paired accuracy difference, 95 % interval and two-sided p over
  the split's resampled subjects (eval's resamples: 2000 draws, seed 0),
  precision, recall and the errors by cause.

Decision, fixed before the runs: ``pelmark eval`` adopts the chosen border
for canvas-margin runs only if, over the six margin runs of rounds 7 and 8,
the mean paired difference of novel-subject accuracy is above 0 and no run's
interval lies wholly below 0; the same test over the three plain 16-epoch
runs decides it for plain runs. Table 1 (argmax RMSE over truly visible
landmarks) does not depend on the presence rule, so round 8's preset decision
(its condition 3) stands whatever this finds.

The rule passed (README, round 9) and ``pelmark eval`` now ships it
(:func:`pelmark.evaluate.visibility.choose_border`); this script calls that
code, so that it compares eval's rule with the same rule held at d = 0. Its
first version, run before the change (commit fd33b05), carried its own copy of
the search and printed the same choices and figures.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pelmark.evaluate.predict import Predictions, flip_choice, predict_split, read_truth, run_classes
from pelmark.evaluate.stat_tables import split_resampling
from pelmark.evaluate.visibility import choose_border, presence, validation_rule, validation_truth
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from visibility_rule import accuracy_cell, paired_accuracy, runs_and_splits

RESAMPLES = 2000


def causes(pred: Predictions, present: np.ndarray) -> str:
    visible = pred.truth.visible
    distance = pred.edge_distance()
    missed = visible & ~present
    parts = {
        "missed (peak outside)": missed & (distance < 0),
        "missed (peak inside)": missed & (distance >= 0),
        "false present": ~visible & present,
    }
    return ", ".join(f"{name} {int(mask.sum())}" for name, mask in parts.items())


def main() -> None:
    args, splits = runs_and_splits(__doc__)
    summary: dict[str, list[tuple[str, float, float, float]]] = {s.label: [] for s in splits}
    for run_dir in args.runs:
        run = load_run(run_dir)
        if not run_classes(run):
            raise SystemExit(f"{run_dir}: not a segmentation-informed run")
        margin = int(run.config.canvas_margin_px or 0)
        order, _ = flip_choice(run, None)
        rule = validation_rule(run, args.store, 16, 0, order)
        val = validation_truth(run, args.store)
        val_pred = predict_split(run, args.store, val, progress=False, flip=order)
        level0, _ = choose_border(val_pred, margin, reach_px=0)
        edge0 = dataclasses.replace(rule, threshold=level0, border_px=0)
        accuracy0, accuracy = ((presence(val_pred, r) == val.visible).mean() for r in (edge0, rule))
        print(
            f"{run_dir} ({margin} px margin): at d = 0 {edge0.describe()}, validation accuracy {100 * accuracy0:.2f} %;"
            f" chosen v̂ >= {rule.threshold:g}, border d = {rule.border_px:+d} px, validation accuracy {100 * accuracy:.2f} %"
        )
        for split in splits:
            truth = read_truth(args.store, split, run.config.size)
            pred = predict_split(run, args.store, truth, progress=False, flip=order)
            current, chosen = presence(pred, edge0), presence(pred, rule)
            visible = truth.visible
            draws = split_resampling(truth, RESAMPLES, 0)
            diff, lo, hi, p = paired_accuracy(current, chosen, visible, draws)
            cells = [accuracy_cell(name, present, visible) for name, present in (("d = 0", current), ("chosen", chosen))]
            print(f"  {split.label}: {'; '.join(cells)}; difference {100 * diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}], p {p:.3g}")
            print(f"    errors: d = 0 {causes(pred, current)} | chosen {causes(pred, chosen)}")
            summary[split.label].append(("margin" if margin else "plain", (current == visible).mean(), (chosen == visible).mean(), hi))
    for label, rows in summary.items():
        for kind in ("margin", "plain"):
            picked = [r for r in rows if r[0] == kind]
            if not picked:
                continue
            values = np.asarray([r[1:] for r in picked])
            gain = 100 * (values[:, 1] - values[:, 0])
            print(
                f"{label}, {len(picked)} {kind} runs: d = 0 {100 * values[:, 0].mean():.2f} %, chosen {100 * values[:, 1].mean():.2f} %,"
                f" mean difference {gain.mean():+.2f} points; intervals wholly below 0: {int((values[:, 2] < 0).sum())};"
                f" runs at or above 95 %: d = 0 {int((values[:, 0] >= 0.95).sum())}, chosen {int((values[:, 1] >= 0.95).sum())}"
            )


if __name__ == "__main__":
    main()

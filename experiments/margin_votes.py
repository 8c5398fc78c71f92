"""Should a canvas-margin model's peaks outside the image vote in ``pelmark eval --refine``'s registration?

    python experiments/margin_votes.py STORE RUN_DIR... [--split novel_subject --split novel_view]

A measurement, not a feature: the README's round 11. A model with a canvas
margin is trained to place a landmark that projects just outside the image
where it is, in the margin. ``--refine`` registers the CT landmarks to the
landmarks the model finds in the image (:meth:`Predictions.votes`) and ignores
those peaks; yet an ASIS a few pixels outside the image fixes the pose's lever
arm, and round 8's registered visibility lost most where an absent ASIS
projected just inside the border. This script adds, for each image, every
landmark whose heatmap peaks in the margin with a sigmoid of at least 0.5
(eval's found probability) to the votes (the segmentation covers the image
only, so the on-bone test of v̂ = 1 cannot apply there), runs eval's robust
registration and refinement again, and compares with eval's ``+reg`` row on
the same images: the Table-1 mean of ``<run>+reg`` (model px) and its paired
difference, and the registered visibility accuracy (eval's
:func:`pelmark.evaluate.visibility.registered_presence`) and its paired
difference, both with 95 % intervals and two-sided p over the split's
resampled subjects (eval's resamples: 2000 draws, seed 0); with the median
mTRE of the robust pose.

Decision, fixed before any run of this script: ``pelmark eval`` lets margin
peaks vote only if, over the three 24-epoch margin runs of round 8, the
mean paired change of the novel-subject ``+reg`` Table-1 mean is below 0,
no run's interval lies wholly above 0, and the mean paired change of the
registered novel-subject visibility accuracy is not below 0.

The rule passed (README, round 11) and ``pelmark eval`` now ships it
(:meth:`pelmark.evaluate.predict.Predictions.votes`), so this script compares
eval's votes with the rule they replaced, the votes inside the image only;
its first version (commit a773b48) added the margin peaks to the votes of the
time and printed the same figures.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pelmark.evaluate.pose import Registration, pose_metrics
from pelmark.evaluate.predict import Predictions, flip_choice, predict_split, read_truth
from pelmark.evaluate.refine import refine
from pelmark.evaluate.stat_tables import split_resampling, squared_errors_px
from pelmark.evaluate.stats import paired_difference
from pelmark.evaluate.visibility import presence, registered_presence, validation_rule
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from visibility_rule import paired_accuracy, runs_and_splits

RESAMPLES = 2000


@dataclasses.dataclass(frozen=True, eq=False)
class ImageVotes(Predictions):
    """eval's predictions with the votes of before round 11: only those inside the image."""

    def votes(self) -> np.ndarray:
        return super().votes() & self.inside()


def registered(pred: Predictions, rule):
    """(robust pose errors, the +reg predictor, its registered presence calls)."""
    robust = pose_metrics(pred, Registration.ROBUST)
    refinement = refine(pred, robust)
    shown, shown_rule = registered_presence(pred, rule, refinement)
    return robust, refinement.predictions, presence(shown, shown_rule)


def main() -> None:
    args, splits = runs_and_splits(__doc__)
    summary: dict[str, list[tuple[float, float, float, float]]] = {s.label: [] for s in splits}
    for run_dir in args.runs:
        run = load_run(run_dir)
        order, _ = flip_choice(run, None)
        rule = validation_rule(run, args.store, 16, 0, order)
        for split in splits:
            truth = read_truth(args.store, split, run.config.size)
            pred = predict_split(run, args.store, truth, progress=False, flip=order)
            inside_only = ImageVotes(**{f.name: getattr(pred, f.name) for f in dataclasses.fields(pred)})
            extra = int((pred.votes() & ~inside_only.votes()).sum())
            pose, reg, present = registered(inside_only, rule)
            pose_m, reg_m, present_m = registered(pred, rule)
            draws = split_resampling(truth, RESAMPLES, 0)
            rmse = paired_difference(squared_errors_px(reg), squared_errors_px(reg_m), draws)
            diff, lo, hi, p = paired_accuracy(present, present_m, truth.visible, draws)
            accuracy, accuracy_m = ((calls == truth.visible).mean() for calls in (present, present_m))
            print(f"{run_dir} ({run.config.canvas_margin_px} px margin), {split.label}: {extra} margin peaks added to {int(inside_only.votes().sum())} votes")
            print(
                f"  +reg Table-1 mean: inside only {rmse.baseline_mean:.2f}, with margin votes {rmse.other_mean:.2f} px; difference"
                f" {rmse.difference.value:+.2f} [{rmse.difference.lo:+.2f}, {rmse.difference.hi:+.2f}] ({rmse.relative_pct:+.1f} %), p {rmse.p_value:.3g}"
            )
            print(
                f"  registered visibility: inside only {100 * accuracy:.2f} %, with margin votes {100 * accuracy_m:.2f} %; difference"
                f" {100 * diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}], p {p:.3g}"
            )
            print(
                f"  robust pose median mTRE: inside only {np.nanmedian(pose.mtre_mm):.2f} mm, with margin votes {np.nanmedian(pose_m.mtre_mm):.2f} mm;"
                f" failed registrations {int(pose.degenerate.sum())} -> {int(pose_m.degenerate.sum())}"
            )
            summary[split.label].append((rmse.difference.value, rmse.difference.lo, accuracy_m - accuracy, accuracy_m))
    for label, rows in summary.items():
        values = np.asarray(rows)
        print(
            f"{label}, {len(rows)} runs: +reg Table-1 change {values[:, 0].mean():+.2f} px on average, intervals wholly above 0:"
            f" {int((values[:, 1] > 0).sum())}; registered visibility change {100 * values[:, 2].mean():+.2f} points on average,"
            f" runs at or above 95 % with margin votes: {int((values[:, 3] >= 0.95).sum())}"
        )


if __name__ == "__main__":
    main()

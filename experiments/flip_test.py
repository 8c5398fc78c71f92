"""Does the flip test help, run by run, on the same images? (The measurement behind ``pelmark eval``'s default.)

    python experiments/flip_test.py STORE RUN_DIR... [--split novel_subject --split novel_view]

A measurement, not a feature. For each run and split, the model predicts twice
through eval's own :func:`~pelmark.evaluate.predict.predict_split`: once with the
paper's single pass, once with the flip test (the mean of the logits of each
image and of its left-right mirror image, left and right channels swapped). It
prints Table 1's Mean for both, the paired difference (flip minus single) with
eval's cluster-bootstrap 95 % interval and two-sided p (subjects resampled,
2000 draws, seed 0), and the median error of each. Also, for reference only,
the two passes' other combinations: the mirror image's pass alone, and the mean
of the sigmoid probabilities instead of the logits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pelmark.evaluate.predict import Predictions, flip_choice, predict_split, read_truth
from pelmark.evaluate.stat_tables import split_resampling, squared_errors_px
from pelmark.evaluate.stats import mean_over_landmarks, paired_difference
from pelmark.evaluate.tables import rmse_per_landmark
from pelmark.evaluate.units import Unit
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from pelmark.train.data import DataSettings, StoreDataset
from pelmark.train.model import hard_argmax
from pelmark.train.seg_informed import split_outputs


def mean_rmse(pred: Predictions) -> float:
    return float(mean_over_landmarks(rmse_per_landmark(pred, Unit.MODEL_PX)))


def median(pred: Predictions) -> float:
    return float(np.nanmedian(pred.errors()[Unit.MODEL_PX]))


@torch.no_grad()
def other_combinations(run, store: Path, truth, order: tuple[int, ...]) -> dict[str, Predictions]:
    """The mirror image's pass alone, and the mean of sigmoid probabilities (not what eval ships)."""
    order = torch.as_tensor(order)
    n = truth.true_px.shape[1]
    dataset = StoreDataset(store, DataSettings(size=run.config.size, splits=(truth.split,), targets=False), indices=truth.rows)
    mirror, probability = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=16):
        images = batch["image"]
        direct = run.model(images).float()
        mirrored = run.model(images.flip(-1)).float().flip(-1)[:, order]
        direct, mirrored = split_outputs(direct, n)[0], split_outputs(mirrored, n)[0]
        mirror.append(hard_argmax(mirrored).numpy())
        probability.append(hard_argmax(torch.sigmoid(direct) + torch.sigmoid(mirrored)).numpy())
    return {
        "mirror pass alone": Predictions("mirror", truth, np.concatenate(mirror).astype(np.float64)),
        "mean of probabilities": Predictions("probability", truth, np.concatenate(probability).astype(np.float64)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", action="append", choices=["novel_subject", "novel_view"])
    args = parser.parse_args()
    splits = [Split[label.upper()] for label in (args.split or ["novel_subject", "novel_view"])]
    print("run, split: single pass -> flip test (Mean RMSE, model px); flip minus single [95% CI], p; medians; other combinations")
    for run_dir in args.runs:
        run = load_run(run_dir)
        order, _ = flip_choice(run, True)
        for split in splits:
            truth = read_truth(args.store, split, run.config.size)
            single = predict_split(run, args.store, truth, progress=False)
            flipped = predict_split(run, args.store, truth, progress=False, flip=order)
            draws = split_resampling(truth, 2000, 0)
            d = paired_difference(squared_errors_px(single), squared_errors_px(flipped), draws)
            others = ", ".join(f"{name} {mean_rmse(p):.2f}" for name, p in other_combinations(run, args.store, truth, order).items())
            print(
                f"{run_dir} {split.label}: {d.baseline_mean:.2f} -> {d.other_mean:.2f}, "
                f"{d.difference.value:+.2f} [{d.difference.lo:+.2f}, {d.difference.hi:+.2f}] ({d.relative_pct:+.1f} %), p {d.p_value:.3f}; "
                f"median {median(single):.2f} -> {median(flipped):.2f}; {others}",
                flush=True,
            )


if __name__ == "__main__":
    main()

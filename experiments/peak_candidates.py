"""Do a heatmap's other peaks hold the landmarks its argmax misses, and can the registration pick them?

    python experiments/peak_candidates.py STORE RUN_DIR... [--split novel_subject] [--peaks 3]

A measurement behind the README's account of ``pelmark eval --refine``, not a
feature. For each run, on the split's images (visible landmarks only):

1. Of the argmax detections more than 10 model px from the truth (the gross
   errors that drive Table 1's RMSE), the share whose truth lies within 5 px
   of the heatmap's 2nd, 3rd, ... highest local maximum (a 7 x 7 max-pool,
   the disk target's diameter plus one).
2. Guided matching, a standard step after RANSAC: from ``--refine``'s robust
   pose (eval's own call, on the argmax of the found landmarks), each
   landmark takes the one of its ``--peaks`` highest local maxima nearest to
   its projection, if within RANSAC's 10 px; LM is refitted on those
   matches, three rounds. Printed, as Table 1's Mean (the mean over landmarks
   of each landmark's RMSE): the argmax (raw), ``+reg`` as eval computes it,
   ``+reg`` after guided matching, and the matched peaks themselves (the
   argmax where nothing matched).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pelmark.evaluate.predict import FOUND_PROBABILITY, Predictions, read_truth
from pelmark.evaluate.stats import mean_over_landmarks
from pelmark.evaluate.tables import rmse_per_landmark
from pelmark.evaluate.units import Unit, model_to_detector_px
from pelmark.geometry import project
from pelmark.registration import register, register_robust
from pelmark.registration.robust import RansacSettings, unconfirmed
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from pelmark.train.data import DataSettings, StoreDataset
from pelmark.train.seg_informed import split_outputs

GROSS_PX = 10.0
HIT_PX = 5.0
POOL = 7
ROUNDS = 3


def peaks(run, store: Path, split: Split, count: int):
    """Truth, and the ``count`` highest local maxima of every heatmap: (N, L, K, 2) model px, (N, L, K) sigmoid."""
    truth = read_truth(store, split, run.config.size)
    dataset = StoreDataset(store, DataSettings(size=run.config.size, splits=(split,), targets=False), indices=truth.rows)
    n_landmarks = truth.true_px.shape[1]
    points, probabilities = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=16):
            logits, _ = split_outputs(run.model(batch["image"]).float(), n_landmarks)
            width = logits.shape[-1]
            pooled = torch.nn.functional.max_pool2d(logits, POOL, 1, POOL // 2)
            local = torch.where(logits == pooled, logits, torch.full_like(logits, -torch.inf))
            values, index = local.flatten(2).topk(count, dim=-1)
            points.append(torch.stack([index % width, index // width], -1).double().numpy())
            probabilities.append(torch.sigmoid(values).numpy())
    return truth, np.concatenate(points), np.concatenate(probabilities)


def rmse(predicted: np.ndarray, truth) -> float:
    """Table 1's Mean of these points, in model px."""
    return float(mean_over_landmarks(rmse_per_landmark(Predictions("points", truth, predicted), Unit.MODEL_PX)))


def measure(run_dir: Path, store: Path, split: Split, count: int) -> None:
    run = load_run(run_dir)
    truth, candidates, probability = peaks(run, store, split, count)
    top = candidates[:, :, 0]

    # 1. Where the truth sits among the peaks of the gross errors.
    distance = np.linalg.norm(candidates - truth.true_px[:, :, None], axis=-1)
    gross = truth.visible & (distance[:, :, 0] > GROSS_PX)
    hit = distance[gross] < HIT_PX
    rank = np.where(hit.any(-1), hit.argmax(-1), count)
    shares = ", ".join(f"peak {k + 1}: {np.mean(rank == k):.0%}" for k in range(1, count))
    print(f"{run.name} {split.label}: {gross.sum()} gross errors (> {GROSS_PX:g} px); truth within {HIT_PX:g} px of {shares}")

    # 2. Guided matching from --refine's robust pose.
    model_camera, detector_camera = truth.model_camera, truth.store_camera
    n_images, n_landmarks = top.shape[:2]
    detector = model_to_detector_px(candidates.reshape(n_images, -1, 2), model_camera, detector_camera).reshape(candidates.shape)
    points = torch.from_numpy(truth.landmarks_3d.astype(np.float64))
    found = probability[:, :, 0] >= FOUND_PROBABILITY
    robust = register_robust(
        torch.from_numpy(np.where(found[..., None], detector[:, :, 0], 0.0)),
        torch.from_numpy(found.astype(np.float64)),
        points,
        detector_camera,
    )
    degenerate = robust.result.degenerate.numpy()
    start_pose, start_inliers = robust.result.pose.double(), robust.inliers.numpy() & found

    def refined(pose: torch.Tensor, inliers: np.ndarray) -> np.ndarray:
        keep_raw = degenerate | unconfirmed(degenerate, inliers)
        return np.where(keep_raw[:, None, None], top, project(points, pose, model_camera).numpy())

    pose, inliers = start_pose, start_inliers
    threshold = RansacSettings().threshold_px
    for _ in range(ROUNDS):
        projected = project(points, pose, detector_camera).numpy()
        gap = np.linalg.norm(detector - projected[:, :, None], axis=-1)
        gap[:, :, 0] = np.where(found, gap[:, :, 0], np.inf)
        pick = gap.argmin(-1)
        matched = np.take_along_axis(gap, pick[..., None], -1)[..., 0] < threshold
        chosen = np.take_along_axis(detector, pick[..., None, None].repeat(2, -1), 2)[:, :, 0]
        result = register(
            torch.from_numpy(np.where(matched[..., None], chosen, 0.0)),
            torch.from_numpy(matched.astype(np.float64)),
            points,
            detector_camera,
            init=pose,
        )
        failed = torch.from_numpy(result.degenerate.numpy() | degenerate)
        pose = torch.where(failed[:, None], start_pose, result.pose.double())
        inliers = np.where(failed.numpy()[:, None], start_inliers, matched)
    chosen_model = np.take_along_axis(candidates, pick[..., None, None].repeat(2, -1), 2)[:, :, 0]
    matched_peaks = np.where(matched[..., None], chosen_model, top)
    print(
        f"  RMSE (model px): raw {rmse(top, truth):.2f}, +reg {rmse(refined(start_pose, start_inliers), truth):.2f}, "
        f"+reg guided {rmse(refined(pose, inliers), truth):.2f}, matched peaks {rmse(matched_peaks, truth):.2f}; "
        f"{int((matched & (pick > 0)).sum())} landmarks moved to another peak; "
        f"inliers per image {start_inliers.sum(1).mean():.2f} -> {inliers.sum(1).mean():.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", default="novel_subject", choices=[s.label for s in Split])
    parser.add_argument("--peaks", type=int, default=3)
    args = parser.parse_args()
    split = next(s for s in Split if s.label == args.split)
    for run_dir in args.runs:
        measure(run_dir, args.store, split, args.peaks)


if __name__ == "__main__":
    main()

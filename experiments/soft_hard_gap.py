"""How far the soft-argmax that PEL registers lies from the hard argmax that Table 1 scores.

    python experiments/soft_hard_gap.py STORE RUN_DIR... [--split novel_subject]

For each run, on the split's images (visible landmarks only), prints the median
and 90th percentile distance (model px) between the hard argmax and the
global soft-argmax at several temperatures τ (paper eqs. 1-2 on the logits),
and the local soft-argmax (a window of radius 3 px around the argmax); the
median peak logit; and the median share of the τ = 1 softmax mass within 5 px
of the argmax.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pelmark.evaluate.predict import read_truth
from pelmark.store import Split
from pelmark.train.checkpoint import load_run
from pelmark.train.data import DataSettings, StoreDataset
from pelmark.train.model import hard_argmax, heatmap_statistics, local_soft_argmax, soft_argmax

TEMPERATURES = (1.0, 0.5, 0.1)


def gaps(run_dir: Path, store: Path, split: Split) -> dict[str, float]:
    run = load_run(run_dir)  # builds the model, which needs autograd once
    with torch.no_grad():
        return _gaps(run, store, split)


def _gaps(run, store: Path, split: Split) -> dict[str, float]:
    truth = read_truth(store, split, run.config.size)
    dataset = StoreDataset(store, DataSettings(size=run.config.size, splits=(split,), targets=False), indices=truth.rows)
    distances: dict[str, list[np.ndarray]] = {f"global τ={t:g}": [] for t in TEMPERATURES}
    distances["local r=3"] = []
    peaks, masses = [], []
    for start in range(0, len(dataset), 16):
        batch = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
        images = torch.stack([b["image"] for b in batch])
        visible = torch.stack([b["visible"] for b in batch]).numpy()
        logits = run.model(images).float()
        hard = hard_argmax(logits)
        for t in TEMPERATURES:
            distances[f"global τ={t:g}"].append((soft_argmax(logits, t) - hard).norm(dim=-1).numpy()[visible])
        distances["local r=3"].append((local_soft_argmax(logits, 3, 1.0) - hard).norm(dim=-1).numpy()[visible])
        statistics = heatmap_statistics(logits, hard, temperature=1.0)
        peaks.append(statistics["peak_logit"].numpy()[visible])
        masses.append(statistics["mass_5px"].numpy()[visible])
    figures = {}
    for name, values in distances.items():
        values = np.concatenate(values)
        figures[f"{name} median px"] = float(np.median(values))
        figures[f"{name} p90 px"] = float(np.percentile(values, 90))
    figures["peak logit median"] = float(np.median(np.concatenate(peaks)))
    figures["mass within 5 px (τ=1) median"] = float(np.median(np.concatenate(masses)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", default="novel_subject", choices=[s.label for s in Split])
    args = parser.parse_args()
    split = {s.label: s for s in Split}[args.split]
    for run_dir in args.runs:
        figures = gaps(run_dir, args.store, split)
        print(f"{run_dir} ({args.split}): " + "; ".join(f"{k} {v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

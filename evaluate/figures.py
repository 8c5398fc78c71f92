"""The PNG figures of ``pelmark eval`` (matplotlib, Agg backend: no display needed).

samples_<split>.png
    A few images of the split (rows) under each predictor (columns), at the
    detector's resolution, with the true landmarks in green and the predicted
    ones in red, joined by a line. A segmentation-informed model's predicted
    bone classes are shown in colour over the image, and the landmarks it
    calls absent are left out.
per_landmark_error.png
    Per-landmark RMSE in model px, grouped bars per predictor, one panel per split.
error_cdf.png
    Cumulative distribution of the visible landmarks' errors in model px, per
    predictor, one panel per split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pelmark.evaluate.predict import Predictions, SplitTruth
from pelmark.evaluate.tables import TableRow, landmark_labels
from pelmark.evaluate.units import Unit, model_to_detector_px


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_positions(n_images: int, samples: int) -> np.ndarray:
    """Up to ``samples`` positions spread evenly over ``n_images`` (first and last included)."""
    if n_images == 0 or samples <= 0:
        return np.zeros(0, dtype=int)
    return np.unique(np.linspace(0, n_images - 1, min(samples, n_images)).round().astype(int))


def write_samples(path: Path, group, truth: SplitTruth, predictions: list[Predictions], samples: int) -> Path:
    """``samples_<split>.png``: picked images of ``truth``'s split under each predictor.

    Args:
        path: the PNG to write.
        group: the open store (images are read from it).
        truth: the split's ground truth (any model size).
        predictions: the predictors to show, each on this split.
        samples: images to show.
    """
    plt = _pyplot()
    picks = sample_positions(truth.n_images, samples)
    columns = predictions or [None]
    fig, axes = plt.subplots(
        max(len(picks), 1), len(columns), figsize=(3.0 * len(columns), 3.1 * max(len(picks), 1)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    true_detector = model_to_detector_px(truth.true_px, truth.model_camera, truth.store_camera)
    for r, position in enumerate(picks):
        image = np.asarray(group["images"][int(truth.rows[position])], dtype=np.float32)
        lo, hi = np.percentile(image, [1, 99.5])
        visible = truth.visible[position]
        for c, pred in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            t = true_detector[position][visible]
            if pred is not None and pred.segmentation is not None:
                # Model-size labels stretched over the detector image: pixel edges onto pixel edges.
                extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
                bones = np.ma.masked_equal(pred.segmentation[position], 0)
                ax.imshow(bones, cmap="tab10", vmin=0, vmax=9, alpha=0.35, interpolation="nearest", extent=extent)
            if pred is not None:
                shown = visible if pred.present is None else visible & pred.present[position]
                t = true_detector[position][shown]
                p = model_to_detector_px(pred.predicted_px[position], pred.truth.model_camera, pred.truth.store_camera)[shown]
                for (tx, ty), (px, py) in zip(t, p):
                    ax.plot([tx, px], [ty, py], color="yellow", linewidth=0.6)
                ax.scatter(p[:, 0], p[:, 1], s=14, c="red", marker="x", linewidths=1.0)
                t = true_detector[position][visible]
            ax.scatter(t[:, 0], t[:, 1], s=12, c="lime", edgecolors="black", linewidths=0.3)
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
            title = "truth" if pred is None else pred.model
            ax.set_title(f"{title}\nrow {int(truth.rows[position])} ({truth.subject_ids[position]})", fontsize=8)
    fig.suptitle(f"{truth.split.label}: green = true, red x = predicted (argmax)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_per_landmark_error(path: Path, rows: list[TableRow], splits: list[str], n_landmarks: int) -> Path:
    """``per_landmark_error.png``: grouped per-landmark RMSE bars (model px) per predictor and split."""
    plt = _pyplot()
    labels = landmark_labels(n_landmarks)
    fig, axes = plt.subplots(1, len(splits), figsize=(max(5.0, 0.9 * n_landmarks + 2.5) * len(splits), 4.0), squeeze=False)
    for ax, split in zip(axes[0], splits):
        shown = [r for r in rows if r.split == split and not r.diverged]
        diverged = [r.model for r in rows if r.split == split and r.diverged]
        width = 0.8 / max(len(shown), 1)
        x = np.arange(n_landmarks)
        for k, row in enumerate(shown):
            values = np.nan_to_num(np.asarray(row.rmse, dtype=np.float64))
            ax.bar(x + (k - (len(shown) - 1) / 2) * width, values, width, label=f"{row.model} (mean {row.mean:.2f})")
        ax.set_xticks(x, labels)
        ax.set_ylabel(f"RMSE, {Unit.MODEL_PX.label}")
        title = split + (f" (DIV: {', '.join(diverged)})" if diverged else "")
        ax.set_title(title, fontsize=10)
        if shown:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_error_cdf(path: Path, predictions: list[Predictions], splits: list[str]) -> Path:
    """``error_cdf.png``: cumulative distribution of visible landmark errors (model px) per predictor and split."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(splits), figsize=(5.0 * len(splits), 4.0), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for pred in predictions:
            if pred.truth.split.label != split:
                continue
            errors = pred.errors()[Unit.MODEL_PX]
            values = np.sort(errors[np.isfinite(errors)])
            if len(values) == 0:
                continue
            fraction = np.arange(1, len(values) + 1) / len(values)
            ax.step(values, fraction, where="post", label=pred.model)
        ax.set_xlabel(f"landmark error, {Unit.MODEL_PX.label}")
        ax.set_ylabel("fraction of visible landmarks")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(left=0.0)
        ax.grid(alpha=0.3)
        ax.set_title(split, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""PNG montages of a store's DRRs with their landmarks: what a user checks before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pelmark.errors import PelmarkError
from pelmark.io.outputs import refuse_inputs
from pelmark.store import Split, StoreReader
from pelmark.validation import PreviewOptions, check


def write_previews(store_path: Path, out_dir: Path, per_split: int = 12, columns: int = 4) -> list[Path]:
    """One montage per split present in the store. Returns the PNG paths.

    Visible landmarks are green dots with their index (L1..); landmarks that
    fall outside the detector are red crosses drawn in the margin around the image.

    Raises:
        PelmarkError: ``per_split`` is below 1, ``out_dir`` is a file or lies in the store,
            or the store is not one; nothing is written then.
    """
    check(PreviewOptions, {"per_split": per_split})
    out_dir = Path(out_dir)
    refuse_inputs(out_dir, [("the store", Path(store_path))])
    if out_dir.exists() and not out_dir.is_dir():
        raise PelmarkError("exists and is not a folder; --out names the folder for the PNG montages", out_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reader = StoreReader(store_path)
    group, names = reader.group, list(reader.landmark_names)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PelmarkError(f"cannot create the folder ({exc.strerror})", out_dir) from None
    written = []
    for code in Split:
        rows = reader.rows(code)
        if rows.size == 0:
            continue
        picks = rows[np.linspace(0, rows.size - 1, min(per_split, rows.size)).round().astype(int)]
        n_rows = int(np.ceil(len(picks) / columns))
        fig, axes = plt.subplots(n_rows, columns, figsize=(3.2 * columns, 3.4 * n_rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, row in zip(axes.ravel(), picks):
            _draw(ax, group, int(row), names)
        fig.suptitle(f"{code.label}: {rows.size} images; green = visible, red x = outside the detector")
        fig.tight_layout()
        path = out_dir / f"preview_{code.label}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _draw(ax, group, row: int, names: list[str]) -> None:
    image = np.asarray(group["images"][row], dtype=np.float32)
    points = np.asarray(group["landmarks_2d"][row])
    visible = np.asarray(group["visible"][row])
    height, width = image.shape
    lo, hi = np.percentile(image, [1, 99.5])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    margin = 0.15 * max(height, width)
    ax.set_xlim(-margin, width - 1 + margin)
    ax.set_ylim(height - 1 + margin, -margin)
    for i, ((x, y), vis) in enumerate(zip(points, visible)):
        if vis:
            ax.plot(x, y, "o", ms=4, color="lime", mec="black", mew=0.5)
            ax.annotate(f"L{i + 1}", (x, y), xytext=(3, -3), textcoords="offset points", fontsize=6, color="yellow")
        else:
            ax.plot(np.clip(x, -margin, width - 1 + margin), np.clip(y, -margin, height - 1 + margin), "x", ms=5, color="red")
    subjects = group.attrs["subjects"]
    ax.set_title(f"#{row} {subjects[int(group['subject'][row])]['id']}", fontsize=8)
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])

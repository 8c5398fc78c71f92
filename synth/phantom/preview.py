"""A PNG montage of AP DRRs, one per phantom subject, with the landmarks drawn on.

It is a picture for people: it shows that each phantom looks like a pelvis
and that every landmark sits on its structure. The DRR is the renderer's line
integral; for display only, a blurred copy is subtracted (unsharp masking, as
radiography software does) so bone stands out against the smooth soft-tissue
gradient of the body.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pelmark.geometry import Camera, project
from pelmark.io.ct import CTVolume
from pelmark.synth.render import DRRRenderer, RenderSettings

PREVIEW_PIXELS = 256
FIELD_FRACTION = 0.85  # of the CT's larger extent: the skeleton fills the view, the body's edges may not
UNSHARP_SIGMA = 0.08  # of the image width
UNSHARP_AMOUNT = 0.85


@dataclasses.dataclass(frozen=True)
class PreviewPanel:
    """One subject's AP DRR and where its landmarks project.

    Attributes:
        title: e.g. ``"s003 (novel_subject)"``.
        image: (H, W) line integrals.
        landmarks_px: (L, 2) pixel coordinates (x = column, y = row).
    """

    title: str
    image: np.ndarray
    landmarks_px: np.ndarray


def preview_camera(ct: CTVolume, pixels: int = PREVIEW_PIXELS) -> Camera:
    """A square AP detector that sees most of the CT (the skeleton, with the body's edges cut)."""
    nominal = Camera.centered(pixels)
    lo, hi = ct.bounds_world()
    width_mm = FIELD_FRACTION * float(max(hi[0] - lo[0], hi[2] - lo[2])) * nominal.magnification
    return Camera.centered(pixels, spacing_mm=width_mm / pixels)


def render_panel(
    title: str,
    ct: CTVolume,
    landmarks_world: np.ndarray,
    camera: Camera,
    pose: np.ndarray | None = None,
    device: str = "cpu",
) -> PreviewPanel:
    """Render one DRR (AP unless ``pose`` is given) and project the landmarks with the same geometry."""
    pose_t = torch.zeros(1, 6, dtype=torch.float64) if pose is None else torch.as_tensor(pose, dtype=torch.float64)
    pose_t = pose_t.reshape(1, 6)
    image = DRRRenderer(ct, camera, RenderSettings(), device).render(pose_t)[0].cpu().numpy()
    points = torch.as_tensor(np.asarray(landmarks_world), dtype=torch.float64)[None]
    return PreviewPanel(title, image, project(points, pose_t, camera)[0].numpy())


def display_image(image: np.ndarray) -> np.ndarray:
    """Unsharp-masked, windowed to [0, 1] for display."""
    from scipy.ndimage import gaussian_filter

    sigma = UNSHARP_SIGMA * image.shape[1]
    detail = image - UNSHARP_AMOUNT * gaussian_filter(image, sigma, mode="nearest")
    lo, hi = np.percentile(detail, [1.0, 99.7])
    return np.clip((detail - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def write_montage(path: Path, panels: Sequence[PreviewPanel], names: Sequence[str], columns: int = 4) -> None:
    """Write the panels side by side as a PNG: landmarks are dots labelled L1, L2, ... in the
    order of ``names``, which a caption spells out."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.0 * columns, 4.3 * rows + 0.4), dpi=100)
    colours = matplotlib.colormaps["tab10"]
    for n, panel in enumerate(panels):
        ax = figure.add_subplot(rows, columns, n + 1)
        ax.imshow(display_image(panel.image), cmap="gray", vmin=0.0, vmax=1.0)
        for i, ((x, y), name) in enumerate(zip(panel.landmarks_px, names)):
            ax.plot(x, y, "o", ms=3.5, mec="black", mew=0.5, color=colours(i % 10))
            label = f"L{i + 1}"
            ax.annotate(label, (x, y), xytext=(3, -3), textcoords="offset points", fontsize=6.5, color=colours(i % 10))
        ax.set_title(panel.title, fontsize=9)
        ax.set_axis_off()
    legend = "   ".join(f"L{i + 1} {name}" for i, name in enumerate(names))
    figure.text(0.5, 0.005, legend, ha="center", va="bottom", fontsize=8)
    figure.tight_layout(rect=(0.0, 0.4 / figure.get_figheight(), 1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata={"Software": None})

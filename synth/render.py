"""DRR rendering with DiffDRR 0.6.1, in pelmark's geometry.

pelmark builds DiffDRR's torchio subject itself instead of calling
``diffdrr.data.read``, for two reasons: ``read`` rescales HU by the volume's own
minimum and maximum (so one metal voxel changes every image's contrast), and it
fails on a volume without soft-tissue voxels. Here the renderer integrates the
linear attenuation relative to water, ``mu = max(0, 1 + HU / 1000)``, with bone
optionally weighted, so a line integral is in water-equivalent millimetres.

Speed and memory
----------------
DiffDRR's detector gives the rays; this module decides where along them the
volume is sampled, and which volume:

* The attenuation volume is cropped to the box around its non-air part (plus
  one voxel of margin); the affine moves by exactly the crop offset.
* With ``antialias`` (trilinear only), the volume is then averaged over blocks
  of voxels as large as fit in one detector pixel at the isocentre (2 x 2 x 1
  for a 128-pixel, 2.3 mm detector on a CT of 0.7 x 0.7 x 2.5 mm voxels), as
  the detector's pixels themselves average what falls on them. Detail finer
  than a pixel is then averaged instead of aliased, and there are fewer voxels
  to read. Where the voxels are already as large as the pixels, nothing changes.
* ``Sampling.SLICES`` (the default) samples each ray once per slice it crosses
  along its principal axis (Joseph's method, :mod:`pelmark.synth.slices`),
  with ``grid_sample``'s 2D kernel on the volume directly.
* ``Sampling.UNIFORM`` samples each ray on a grid of ``step_voxels`` voxels (at
  most ``max_step_mm``) from its entry, through DiffDRR's ``Trilinear``, between
  its own entry into and exit from the box, further clipped to where it can
  meet non-air (:class:`BodyOccupancy`, probed by one ray per block of pixels).
  Rays are cut into segments of ``_SEGMENT_SAMPLES`` samples; each segment is
  one batch entry of ``Trilinear`` with its own ``alphamin``/``alphamax``, so
  rays of any length share one call (``grid_sample``'s 3D CPU kernel runs in
  parallel only across the batch, so this also puts every core to work).
* Every renderer call holds at most ``chunk_samples`` samples, which bounds memory.
* The volume is stored contiguous in the (K, J, I) order that ``grid_sample``
  reads, so the neighbouring rays of a detector row share cache lines.

Each sample is weighted by its ray's step in mm, so an image is a line integral
in mm whatever the number of samples. Rays are integrated along their whole
path through the volume, also past the detector plane (as DiffDRR's Siddon
does), so a volume that reaches through the detector shows no cut edge.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from pelmark import geometry
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.io.ct import CTVolume
from pelmark.synth.slices import SliceLabelCounter, SliceSampler


class RendererKind(str, Enum):
    SIDDON = "siddon"
    TRILINEAR = "trilinear"
    NANODRR = "nanodrr"  # nanodrr's fused Triton kernel: the fast path on a GPU (pelmark.synth.nanodrr_backend)


class Sampling(str, Enum):
    """Where the trilinear renderer samples each ray."""

    SLICES = "slices"  # once per slice of the ray's principal axis (Joseph's method)
    UNIFORM = "uniform"  # every `step_voxels` from the ray's entry, or `n_points` per ray


# Samples per renderer call when `RenderSettings.chunk_samples` is None. On a CPU,
# uniform calls of about 1M samples (about 50 MB of temporaries) were fastest, and
# slice calls of 4M (12 bytes a sample: a whole 128² pose in one call) were faster
# than 1M; a GPU needs big calls to hide kernel-launch overhead.
_AUTO_CHUNK_SAMPLES = {"cpu": 1 << 20, "cuda": 1 << 26}
_AUTO_CHUNK_SAMPLES_SLICES = {"cpu": 1 << 22, "cuda": 1 << 26}
# Rays traced together: one 768x768 pose on a CPU, a batch of poses on a GPU.
_AUTO_RAYS_PER_PASS = {"cpu": 1 << 20, "cuda": 1 << 23}
# Trilinear samples per renderer batch entry (32 was faster than 16 or 64 on a CPU,
# and than shortening each ray's last segment to a multiple of 8).
_SEGMENT_SAMPLES = 32


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How DRRs are computed.

    Attributes:
        renderer: trilinear is fast; Siddon (DiffDRR's) is the exact reference; nanodrr
            (an optional package) marches each ray in one fused kernel on a GPU, on the
            volume trilinear renders (crop and ``antialias`` included), with ``n_points``
            samples per ray or as few as keep every step within one voxel and
            ``max_step_mm`` (see :mod:`pelmark.synth.nanodrr_backend`).
        sampling: where trilinear samples each ray. ``slices``: where the ray
            crosses each voxel plane of its principal axis, one voxel apart along
            that axis (see :mod:`pelmark.synth.slices`). ``uniform``: every
            ``step_voxels`` (at most ``max_step_mm``), or ``n_points`` per ray,
            through DiffDRR's ``Trilinear``: 4 to 11 times slower on a CPU (on
            DiffDRR's example CT at 128² and 768², and on the demo's phantoms).
        antialias: (trilinear) average the volume over blocks of voxels as large as
            fit, per axis, in one detector pixel at the isocentre (the pixel's size
            over the magnification ``sdd / sid``), before sampling it; see the module
            docstring. The images then show the detail a detector of that
            resolution records, not an aliased version of finer detail.
        step_voxels: (uniform sampling) trilinear sample spacing along each ray in
            voxels, measured in voxel-index space (so on an anisotropic grid a step
            spans the same fraction of a voxel along every axis). At 2, DRRs of
            DiffDRR's example chest CT differ from those at 0.25 by at most 0.3% of
            their range; a structure one voxel thin along the ray can gain or lose
            up to one voxel's worth of attenuation. At 1 (half the speed), a ray
            along a voxel axis integrates the trilinear volume exactly.
        max_step_mm: but never a step longer than this. On a coarse volume (4 mm
            voxels, say) 2 voxels would be 8 mm, and an object a few voxels across,
            such as a bead, would come out brighter or dimmer depending on where
            the samples fall, which moves its centroid (by up to 0.45 px in
            tests/synth/test_synth_phantom.py, against 0.33 px with this cap).
        n_points: (uniform sampling) if set, this many trilinear samples on every
            ray instead of ``step_voxels`` and ``max_step_mm`` (still only over the
            ray's own path through the volume).
        bone_hu: HU above which a voxel counts as bone.
        bone_multiplier: extra weight on bone attenuation (1 = physical).
        crop_to_body: render from the box around the non-air part of the volume, and
            (uniform sampling) sample each ray only where it can meet non-air.
        air_threshold: attenuation (water = 1) at or below which a 2x2x2 block of
            voxels counts as air (on its mean) for ``crop_to_body``. Only air by
            this test is left out, so a line integral changes by at most this much
            attenuation times the path length left out (in practice far less).
        chunk_samples: samples per renderer call, which bounds memory (about 50
            bytes a sample with uniform sampling, 12 with slices); None picks one for
            the device. Images do not depend on it.
        compile: ``torch.compile`` DiffDRR's renderer module (uniform sampling and
            Siddon; slice sampling does not use it). On 2 CPU cores, uniform
            sampling renders about 1.4x faster, after about 10 s of compiling on
            first use (cached on disk) and with a C++ compiler installed. Off by
            default so that tests and one-off renders start at once.
    """

    renderer: RendererKind = RendererKind.TRILINEAR
    sampling: Sampling = Sampling.SLICES
    antialias: bool = True
    step_voxels: float = 2.0
    max_step_mm: float = 2.0
    n_points: int | None = None
    bone_hu: float = 350.0
    bone_multiplier: float = 1.0
    crop_to_body: bool = True
    air_threshold: float = 0.1
    chunk_samples: int | None = None
    compile: bool = False

    def __post_init__(self):
        problems = []
        if not self.step_voxels > 0 or not self.max_step_mm > 0:
            problems.append("step_voxels and max_step_mm must be positive")
        if self.n_points is not None and self.n_points < 2:
            problems.append("n_points must be at least 2")
        if self.chunk_samples is not None and self.chunk_samples < 1:
            problems.append("chunk_samples must be positive")
        if self.n_points is not None and self.renderer == RendererKind.TRILINEAR and self.sampling != Sampling.UNIFORM:
            problems.append("n_points needs sampling='uniform'")
        if problems:
            raise PelmarkError("invalid render settings: " + "; ".join(problems))


def hu_to_attenuation(hu: np.ndarray, settings: RenderSettings) -> np.ndarray:
    """Linear attenuation relative to water, float32, never negative."""
    mu = np.clip(1.0 + hu.astype(np.float32) / 1000.0, 0.0, None)
    if settings.bone_multiplier != 1.0:
        mu = np.where(hu > settings.bone_hu, mu * settings.bone_multiplier, mu)
    return mu.astype(np.float32)


def solid_blocks(mu: Tensor, air_threshold: float, block: int = 2) -> Tensor:
    """True for each ``block``-sized cube of an attenuation volume whose mean is above ``air_threshold``.

    A volume with none is all air: the input check refuses it (see :func:`body_box`).
    """
    return torch.nn.functional.avg_pool3d(mu[None, None].float(), block, ceil_mode=True)[0, 0] > air_threshold


def body_box(mu: Tensor, air_threshold: float, block: int = 2, margin: int = 1) -> tuple[list[int], list[int]]:
    """Index range ``[lo, hi)`` per axis of the non-air part of an attenuation volume.

    The test is on the mean of ``block``-sized cubes, so lone noisy air voxels
    do not stretch the box to the volume's edges, while a single voxel denser
    than ``block**3 * air_threshold`` (0.8, about water, by default) still counts.
    ``margin`` voxels are kept around the box so that trilinear samples near
    its faces see the same neighbours as in the whole volume.
    """
    solid = solid_blocks(mu, air_threshold, block)
    if not bool(solid.any()):
        return [0, 0, 0], [1, 1, 1]  # all air: keep one voxel so that shapes stay valid
    lo, hi = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        index = torch.nonzero(solid.any(dim=others)).flatten()
        lo.append(max(int(index[0]) * block - margin, 0))
        hi.append(min((int(index[-1]) + 1) * block + margin, mu.shape[axis]))
    return lo, hi


def antialias_block(spacing_mm: np.ndarray, camera: Camera) -> tuple[int, int, int]:
    """Voxels per axis that ``antialias`` averages: as many as fit in one detector pixel at the isocentre.

    Rounded down, so the volume never becomes coarser than the detector's
    resolution at the isocentre, its finer pixel axis if they differ.
    """
    pixel_at_isocentre_mm = min(camera.spacing_x_mm, camera.spacing_y_mm) / camera.magnification
    # The small tolerance keeps an exact fit (2 x 1.25 mm in a 2.5 mm pixel) from rounding down.
    return tuple(max(1, math.floor(pixel_at_isocentre_mm / float(s) * (1 + 1e-9))) for s in spacing_mm)


def block_average(mu: Tensor, affine: np.ndarray, block: tuple[int, int, int]) -> tuple[Tensor, np.ndarray]:
    """The mean of each ``block`` of voxels, and the affine of the block centres.

    The volume is padded with air (0) at its far faces to whole blocks, so every
    voxel's attenuation is kept and line integrals through the volume are preserved.
    Block ``n`` covers voxels ``block * n`` to ``block * (n + 1) - 1``: its centre
    is at index ``block * n + (block - 1) / 2``.
    """
    if tuple(block) == (1, 1, 1):
        return mu, affine
    pad = [(-size) % b for size, b in zip(mu.shape, block)]
    padded = torch.nn.functional.pad(mu[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))
    averaged = torch.nn.functional.avg_pool3d(padded, block)[0, 0]
    scale = np.asarray(block, dtype=np.float64)
    out = affine.copy()
    out[:3, 3] += affine[:3, :3] @ ((scale - 1.0) / 2.0)
    out[:3, :3] = affine[:3, :3] * scale[None, :]
    return averaged, out


def attenuation_volume(
    ct: CTVolume, settings: RenderSettings, block: tuple[int, int, int] = (1, 1, 1)
) -> tuple[Tensor, np.ndarray]:
    """The (I, J, K) attenuation volume to render and its index-to-world affine.

    With ``crop_to_body`` the volume is cut to :func:`body_box`, widened to whole
    ``block``s of the whole volume (so that the blocks averaged are the same as
    without the crop), and the affine's translation moves by ``A @ lo``
    so that every kept voxel keeps its world position. Then :func:`block_average`
    averages blocks of ``block`` voxels. The tensor is stored contiguous in
    (K, J, I) order, the order in which ``grid_sample`` reads it.
    """
    mu = torch.from_numpy(hu_to_attenuation(ct.hu, settings))
    lo, hi = crop_box(mu, settings, block)
    return _cropped_averaged(mu, ct.affine_world, lo, hi, block)


def crop_box(mu: Tensor, settings: RenderSettings, block: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """The index range ``[lo, hi)`` per axis that :func:`attenuation_volume` keeps (the whole volume without ``crop_to_body``)."""
    if not settings.crop_to_body:
        return [0, 0, 0], list(mu.shape)
    lo, hi = body_box(mu, settings.air_threshold)
    lo = [start - start % b for start, b in zip(lo, block)]
    hi = [min(stop + (-stop) % b, size) for stop, b, size in zip(hi, block, mu.shape)]
    return lo, hi


def _cropped_averaged(
    volume: Tensor, affine: np.ndarray, lo: list[int], hi: list[int], block: tuple[int, int, int]
) -> tuple[Tensor, np.ndarray]:
    """``volume[lo:hi]`` averaged over ``block``s, (K, J, I)-contiguous, with its affine (see :func:`attenuation_volume`)."""
    affine = affine.copy()
    volume = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    affine[:3, 3] += affine[:3, :3] @ np.asarray(lo, dtype=np.float64)
    volume, affine = block_average(volume, affine, block)
    return _kji_contiguous(volume), affine


def label_volumes(
    labels: np.ndarray, ct: CTVolume, settings: RenderSettings, block: tuple[int, int, int], n_classes: int
) -> Tensor:
    """(C, I', J', K') float32: for each class ``k = 1..C``, the fraction of each rendered voxel that is class ``k``.

    The label volume is on the CT's grid; each class's indicator is cropped and block-averaged
    exactly as :func:`attenuation_volume` treats the CT, so that the classes share the rendered
    attenuation volume's grid and affine, and a ray's integral of class ``k`` is its path length
    through that bone (mm), sampled where the image is.
    """
    mu = torch.from_numpy(hu_to_attenuation(ct.hu, settings))
    lo, hi = crop_box(mu, settings, block)
    values = torch.from_numpy(np.asarray(labels, dtype=np.uint8))
    channels = []
    for k in range(1, n_classes + 1):
        indicator, _ = _cropped_averaged((values == k).to(torch.float32), ct.affine_world, lo, hi, block)
        channels.append(indicator)
    return torch.stack(channels)


class LabelGrid:
    """Bone labels on the rendered grid, for :meth:`DRRRenderer.render_labels` to project in one read a sample.

    Made by :func:`label_grid`. The labels are cut to the box around the bones (with one
    voxel of background around it), so rays are sampled only where they can meet bone.

    Attributes:
        labels: (I'', J'', K'') uint8, 0 (background) to C: the rendered grid's voxels in the bones' box.
        offset: (3,) index in the rendered volume of ``labels[0, 0, 0]`` (-1 where the box reaches a face).
        volume_shape: shape of the rendered volume the labels are on.
        n_classes: C.
        counter: the labels' slice sampler (:class:`~pelmark.synth.slices.SliceLabelCounter`; its
            stacks are made once, on first use).
    """

    def __init__(
        self,
        labels: Tensor,
        offset: tuple[int, int, int],
        volume_shape: tuple[int, int, int],
        n_classes: int,
    ):
        self.labels = labels
        self.offset = offset
        self.volume_shape = volume_shape
        self.n_classes = n_classes
        self.counter = SliceLabelCounter(labels, n_classes)


def label_grid(
    labels: np.ndarray,
    ct: CTVolume,
    settings: RenderSettings,
    block: tuple[int, int, int],
    n_classes: int,
    device: str | torch.device = "cpu",
) -> LabelGrid:
    """The CT's label volume on the rendered grid (cropped and block-averaged as :func:`attenuation_volume`), one class a voxel.

    A rendered voxel that averages a block of CT voxels takes the class that fills the most
    of the block, bones winning a tie with background and lower classes a tie between bones
    (as in :func:`labels_from_paths`): the class whose fraction (:func:`label_volumes`) is largest.
    """
    mu = torch.from_numpy(hu_to_attenuation(ct.hu, settings))
    lo, hi = crop_box(mu, settings, block)
    values = torch.from_numpy(np.asarray(labels, dtype=np.uint8))
    if tuple(block) == (1, 1, 1):
        grid = values[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    else:
        best, best_fraction, bone_fraction = None, None, None
        for k in range(1, n_classes + 1):
            fraction, _ = _cropped_averaged((values == k).to(torch.float32), ct.affine_world, lo, hi, block)
            if best is None:
                best, best_fraction, bone_fraction = torch.ones_like(fraction, dtype=torch.uint8), fraction, fraction.clone()
            else:
                larger = fraction > best_fraction  # strictly: the lower class keeps a tie
                best = torch.where(larger, k, best).to(torch.uint8)
                best_fraction = torch.where(larger, fraction, best_fraction)
                bone_fraction += fraction
        # Background is what no class fills (also the air padding the far faces to whole blocks).
        grid = torch.where((best_fraction > 0) & (best_fraction >= 1.0 - bone_fraction), best, 0).to(torch.uint8)
    volume_shape = tuple(int(s) for s in grid.shape)
    bone = torch.nonzero(grid)
    first, last = (bone.amin(dim=0).tolist(), bone.amax(dim=0).tolist()) if len(bone) else ([0, 0, 0], [-1, -1, -1])
    cut = torch.zeros([b - a + 3 for a, b in zip(first, last)], dtype=torch.uint8)
    cut[1:-1, 1:-1, 1:-1] = grid[first[0] : last[0] + 1, first[1] : last[1] + 1, first[2] : last[2] + 1]
    return LabelGrid(cut.to(device), tuple(a - 1 for a in first), volume_shape, n_classes)

# A pixel whose longest path through any one bone is shorter than this is background: a ray that
# only grazes a bone's surface (a voxel's partial volume) does not make the pixel that bone's.
LABEL_MIN_PATH_MM = 1.0


def labels_from_paths(paths_mm: Tensor, min_path_mm: float) -> Tensor:
    """(..., H, W) uint8 label map from (..., C, H, W) path lengths: the class (1..C) with the longest path, 0 below ``min_path_mm``.

    Ties go to the lower class value, so the map is deterministic.
    """
    longest, index = paths_mm.max(dim=-3)
    return torch.where(longest >= min_path_mm, index + 1, 0).to(torch.uint8)


def _kji_contiguous(volume: Tensor) -> Tensor:
    """The same (I, J, K) tensor with memory laid out in (K, J, I) order (no copy if it already is)."""
    return volume.permute(2, 1, 0).contiguous().permute(2, 1, 0)


def make_subject(ct: CTVolume, settings: RenderSettings, block: tuple[int, int, int] = (1, 1, 1)):
    """The torchio subject DiffDRR expects, in pelmark's world frame (centred RAS)."""
    from torchio import ScalarImage, Subject

    mu, affine = attenuation_volume(ct, settings, block)
    density = ScalarImage(tensor=mu[None], affine=affine)
    return Subject(
        # DiffDRR reads only the affine of `volume`; the density stands in for it to save memory.
        volume=density,
        density=density,
        mask=None,
        orientation="AP",
        reorient=geometry.diffdrr_reorient(),
        fiducials=None,
    )


def ray_box_interval(source: Tensor, target: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Where the rays ``source + a (target - source)``, a >= 0, are inside an axis-aligned box.

    Rays go on past the target (a > 1): see the module docstring.

    Args:
        source, target: (R, 3) ray ends.
        lower, upper: (3,) box corners.

    Returns:
        (R,) entry and exit values of ``a``; exit <= entry where a ray misses the box.
    """
    direction = target - source
    parallel = direction.abs() < 1e-12
    safe = torch.where(parallel, torch.ones_like(direction), direction)
    a0 = (lower - source) / safe
    a1 = (upper - source) / safe
    near = torch.minimum(a0, a1)
    far = torch.maximum(a0, a1)
    # A ray parallel to a pair of faces is between them everywhere or nowhere.
    between = (source >= lower) & (source <= upper)
    near = torch.where(parallel, torch.where(between, -math.inf, math.inf), near)
    far = torch.where(parallel, torch.where(between, math.inf, -math.inf), far)
    return near.amax(dim=-1).clamp_min(0.0), far.amin(dim=-1)


class BodyOccupancy:
    """Coarse cells of an attenuation volume that may hold non-air, to clip rays to the body.

    A cell is ``CELL`` voxels on a side and counts as occupied when any of its
    2x2x2 blocks is solid by the crop's test (mean above ``air_threshold``);
    occupancy is then spread by ``DILATION`` cells, also past the volume's faces.
    """

    CELL = 2
    DILATION = 3

    def __init__(self, mu: Tensor, air_threshold: float):
        solid = torch.nn.functional.avg_pool3d(mu[None, None].float(), 2, ceil_mode=True) > air_threshold
        cells = torch.nn.functional.max_pool3d(solid.float(), self.CELL // 2, ceil_mode=True)
        d = self.DILATION
        cells = torch.nn.functional.pad(cells, (d,) * 6)
        occupied = torch.nn.functional.max_pool3d(cells, 2 * d + 1, stride=1, padding=d)[0, 0]
        self.n_cells = torch.tensor(occupied.shape, dtype=torch.float64, device=mu.device)
        self._grid = occupied.permute(2, 1, 0).contiguous()[None, None]  # (1, 1, K, J, I) for grid_sample
        # The voxel-index box the padded cells cover.
        self.lower = torch.full_like(self.n_cells, -0.5 - self.CELL * d)
        self.upper = self.CELL * (self.n_cells - d) - 0.5

    def interval(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Bounds of ``a`` outside which the rays ``source + a (target - source)`` meet no occupied cell.

        Each ray is probed at its nearest cell every ``CELL`` voxels, and the bounds
        are one probe wider than the first and last occupied probe, so a point on
        the ray within ``CELL * DILATION - CELL / 2`` voxels (per axis) of a solid
        block is always inside them. Rays meeting nothing get (inf, -inf).

        Args:
            source, target: (R, 3) ray ends in voxel-index coordinates, float64.
        """
        a0, a1 = ray_box_interval(source, target, self.lower, self.upper)
        a0 = torch.where(a1 >= a0, a0, 0.0)  # keeps the probes of rays that miss finite
        delta = self.CELL / (target - source).norm(dim=-1)  # one probe per cell, as a step in `a`
        # One probe past the exit, so every point of [a0, a1] has a probe within delta / 2.
        last_probe = ((a1 - a0) / delta).ceil()
        n = int(last_probe.max().clamp_min(0)) + 1
        # grid_sample coordinates of the probes, start + k * increment, in one fused float32 op.
        scale = 2.0 / (self.CELL * self.n_cells)
        start = ((source + a0[:, None] * (target - source) + 0.5) * scale + 2.0 * self.DILATION / self.n_cells - 1.0)
        increment = delta[:, None] * (target - source) * scale
        k = torch.arange(n, device=source.device, dtype=torch.float32)
        grid = torch.addcmul(start.float()[:, None], k[None, :, None], increment.float()[:, None])
        occupied = torch.nn.functional.grid_sample(self._grid, grid[None, None], mode="nearest", align_corners=False)
        occupied = (occupied[0, 0, 0] > 0) & (k[None] <= last_probe[:, None])
        k64 = k.double()[None]
        first = torch.where(occupied, k64, math.inf).amin(dim=1)
        last = torch.where(occupied, k64, -math.inf).amax(dim=1)
        return a0 + (first - 1.0) * delta, a0 + (last + 1.0) * delta


@dataclasses.dataclass(frozen=True)
class _Rays:
    """Rays of one or more poses in the volume's index space, clipped to the volume."""

    source_vox: Tensor  # (R, 3) float64
    target_vox: Tensor  # (R, 3) float64, on the detector
    length_mm: Tensor  # (R,) float32, source-to-detector distance in world mm
    entry: Tensor  # (R,) float64, as a fraction of the source-to-detector distance
    exit: Tensor  # (R,) float64; exit <= entry where a ray misses the volume

    @property
    def hit(self) -> Tensor:
        return self.exit > self.entry


class DRRRenderer:
    """Renders DRRs of one CT for batches of poses θ.

    Args:
        ct: the volume.
        camera: detector and nominal C-arm.
        settings: renderer choice, sampling and attenuation model.
        device: torch device to render on.
    """

    def __init__(self, ct: CTVolume, camera: Camera, settings: RenderSettings, device: str | torch.device = "cpu"):
        from diffdrr.drr import DRR

        self.camera = camera
        self.settings = settings
        self.device = torch.device(device)
        trilinear = settings.renderer == RendererKind.TRILINEAR
        nanodrr = settings.renderer == RendererKind.NANODRR
        if nanodrr:
            from pelmark.synth.nanodrr_backend import import_nanodrr

            import_nanodrr()  # before any work: one line if it is not installed
        # Voxels averaged into one, per axis (1, 1, 1: the CT's own voxels).
        sampled = trilinear or nanodrr
        self.block = antialias_block(ct.spacing_mm, camera) if sampled and settings.antialias else (1, 1, 1)
        subject = make_subject(ct, settings, self.block)
        self.drr = DRR(
            subject,
            **geometry.diffdrr_detector_kwargs(camera),
            # nanodrr renders the images; DiffDRR's detector still gives the rays of the labels.
            renderer="siddon" if settings.renderer == RendererKind.SIDDON else "trilinear",
        ).to(self.device)
        self.drr.density = _kji_contiguous(self.drr.density)  # a no-op unless `.to` changed the layout
        self._renderer = torch.compile(self.drr.renderer) if settings.compile else self.drr.renderer

        dims = torch.tensor(self.volume_shape, dtype=torch.float64, device=self.device)
        if settings.renderer == RendererKind.TRILINEAR:
            # With zero padding, trilinear values fade to 0 one voxel beyond the outer
            # voxel centres, so rays span [-1, n]; Siddon's cells span [-0.5, n - 0.5].
            self._box = (torch.full_like(dims, -1.0), dims)
        else:
            self._box = (torch.full_like(dims, -0.5), dims - 0.5)
        self._siddon_samples = int(dims.sum()) + 3  # Siddon samples between every pair of planes
        self._slices = None
        self._occupancy = None
        if trilinear and settings.sampling == Sampling.SLICES:
            self._slices = SliceSampler(self.drr.density)
        elif trilinear and settings.crop_to_body:
            self._occupancy = BodyOccupancy(self.drr.density, settings.air_threshold)
        kind = self.device.type if self.device.type in _AUTO_CHUNK_SAMPLES else "cpu"
        auto_chunk = _AUTO_CHUNK_SAMPLES_SLICES if self._slices is not None else _AUTO_CHUNK_SAMPLES
        self._chunk_samples = settings.chunk_samples or auto_chunk[kind]
        self._poses_per_pass = max(1, _AUTO_RAYS_PER_PASS[kind] // (camera.height * camera.width))
        # The poses and rays of the last pass of `render_iter`, which `render_labels` reuses for the same poses.
        self._last_pass: tuple[Tensor, _Rays] | None = None
        self._nanodrr = None
        if nanodrr:
            from pelmark.synth.nanodrr_backend import NanoDRRBackend, samples_per_ray

            affine = np.asarray(subject["density"].affine, dtype=np.float64)
            n_samples = settings.n_points or samples_per_ray(self.volume_shape, affine, settings.max_step_mm)
            self._nanodrr = NanoDRRBackend(self.drr.density, affine, camera, n_samples, chunk_samples=settings.chunk_samples)
            if kind == "cuda":  # the fused kernel holds no samples: about 20 bytes a ray
                self._poses_per_pass = max(1, (1 << 25) // (camera.height * camera.width))

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """Shape of the attenuation volume rendered (after any crop and block averaging)."""
        return tuple(int(s) for s in self.drr.density.shape)

    @torch.no_grad()
    def render(self, poses: Tensor | np.ndarray) -> Tensor:
        """(B, H, W) float32 line integrals (water-equivalent mm) for poses θ (B, 6)."""
        return torch.stack(list(self.render_iter(poses)))

    def label_grid(self, labels: np.ndarray, ct: CTVolume, n_classes: int) -> LabelGrid:
        """The bone labels of ``ct`` (on its grid) for :meth:`render_labels`, on this renderer's grid and device."""
        return label_grid(labels, ct, self.settings, self.block, n_classes, self.device)

    @torch.no_grad()
    def render_labels(self, poses: Tensor | np.ndarray, classes: Tensor | LabelGrid) -> Tensor:
        """(B, C, H, W) float32 path lengths (mm) of each pose's rays through each class.

        The rays are the image's own (:meth:`render`'s detector, pose and volume grid), sampled
        on the slices they cross (Joseph's method, as the default image), whatever the image's
        renderer; with Siddon or uniform sampling the class paths are still along the image's rays.

        Args:
            poses: (B, 6) θ.
            classes: the bone labels on the rendered grid (:func:`label_grid`), or (C, I, J, K)
                per-class volumes on it (:func:`label_volumes`), which are interpolated, C reads a
                sample, where the labels take one (see :meth:`_label_grid_paths`).
        """
        poses = torch.as_tensor(poses, dtype=torch.float64)
        if isinstance(classes, LabelGrid):
            return self._label_grid_paths(poses, classes)
        if tuple(classes.shape[1:]) != self.volume_shape:
            raise ValueError(f"class volumes of shape {tuple(classes.shape[1:])}, the rendered volume is {self.volume_shape}")
        sampler = SliceSampler(classes.to(self.device))
        dims = torch.tensor(self.volume_shape, dtype=torch.float64, device=self.device)
        out = []
        for pose in poses:
            rays = self._rays(pose[None])
            # The trilinear support, whatever box the image's renderer clipped its rays to.
            entry, exit_ = ray_box_interval(rays.source_vox, rays.target_vox, torch.full_like(dims, -1.0), dims)
            paths = sampler.integrate(rays.source_vox, rays.target_vox, rays.length_mm, entry, exit_, self._chunk_samples)
            out.append(paths.view(len(classes), self.camera.height, self.camera.width))
        return torch.stack(out)

    def _label_grid_paths(self, poses: Tensor, grid: LabelGrid) -> Tensor:
        """(B, C, H, W) path lengths through each class of a :class:`LabelGrid`, along the image's rays.

        Each ray is sampled on the same slices as with per-class volumes, but only within the
        bones' box, and a sample counts the step of its ray (``length / |d_a|``, the slice
        spacing along the ray) for the class of the nearest voxel in its slice
        (:class:`~pelmark.synth.slices.SliceLabelCounter`): one read a sample instead of C.

        Why a pixel keeps its label: a class's path is then its number of samples times the
        step, against the integral of its bilinearly interpolated fraction; the two differ
        only at samples whose in-slice neighbours are of more than one class, i.e. within a
        voxel of a bone's surface. For a ray through one bone only, that bone is the only
        class either way, and a ray crossing its surfaces changes by less than a step at each
        crossing, so the pixel keeps its label unless its path is within about a step of
        ``LABEL_MIN_PATH_MM``. For a ray through several bones, a pixel whose longest path leads
        the second by more than a step per surface crossed keeps its label. What can change are
        rays near joints (two bones about equally long) and rays that run along a surface
        within a voxel of it, to which interpolation gives a fraction of the bone beside them
        and the nearest class all or none. tests/synth/test_label_grid.py measures this on a
        phantom: about 98 % of the pixels agree, and all whose lead is over 15 mm.
        """
        if grid.volume_shape != self.volume_shape:
            raise ValueError(f"labels on a grid of shape {grid.volume_shape}, the rendered volume is {self.volume_shape}")
        counter = grid.counter
        if counter.labels.device != self.device:
            counter = SliceLabelCounter(grid.labels.to(self.device), grid.n_classes)
        offset = torch.tensor(grid.offset, dtype=torch.float64, device=self.device)
        dims = torch.tensor(counter.shape, dtype=torch.float64, device=self.device)
        out = []
        for pose_rays in self._rays_of_each(poses):
            source, target = pose_rays.source_vox - offset, pose_rays.target_vox - offset
            # One voxel past the box on every side holds all the nearest samples of its voxels.
            entry, exit_ = ray_box_interval(source, target, torch.full_like(dims, -1.0), dims)
            counts = counter.count(source, target, entry, exit_, self._chunk_samples)
            direction = target - source
            step_mm = (pose_rays.length_mm.double() / direction.abs().amax(dim=-1)).float()
            out.append((counts * step_mm).view(grid.n_classes, self.camera.height, self.camera.width))
        return torch.stack(out)

    def _rays_of_each(self, poses: Tensor) -> Iterator[_Rays]:
        """The rays of each pose in turn: those :meth:`render` traced last when it rendered these poses.

        Images then labels of one batch (as synth renders them) trace their rays once. A
        pose's rays do not depend on the poses traced with it (see :meth:`_rays`), so
        reused rays are the ones :meth:`_rays` would trace again.
        """
        pixels = self.camera.height * self.camera.width
        if self._last_pass is not None:
            last_poses, rays = self._last_pass
            if last_poses.shape == poses.shape and torch.equal(last_poses, poses.to(last_poses.device)):
                for j in range(len(poses)):
                    ray = slice(j * pixels, (j + 1) * pixels)
                    yield _Rays(rays.source_vox[ray], rays.target_vox[ray], rays.length_mm[ray], rays.entry[ray], rays.exit[ray])
                return
        for pose in poses:
            yield self._rays(pose[None])

    @torch.no_grad()
    def render_iter(self, poses: Tensor | np.ndarray) -> Iterator[Tensor]:
        """Yield the (H, W) image of each pose θ in turn; poses are traced in batches."""
        poses = torch.as_tensor(poses, dtype=torch.float64)
        for start in range(0, len(poses), self._poses_per_pass):
            batch = poses[start : start + self._poses_per_pass]
            if self._nanodrr is not None:
                yield from self._nanodrr.render(batch)
                continue
            rays = self._rays(batch)
            self._last_pass = (batch, rays)
            if self.settings.renderer == RendererKind.SIDDON:
                images = self._siddon(rays)
            elif self._slices is not None:
                images = self._sliced(rays, len(batch))
            else:
                images = self._trilinear(rays)
            yield from images.view(len(batch), self.camera.height, self.camera.width)

    def _rays(self, poses: Tensor) -> _Rays:
        # One pose at a time: batched float32 matrix products round differently from
        # single ones, and a pose's image should not depend on the poses traced with it.
        ends = [self.drr.detector(geometry.to_diffdrr(pose[None], self.camera).to(self.device), None) for pose in poses]
        source = torch.cat([s for s, _ in ends])  # world mm: (B, 1, 3)
        target = torch.cat([t for _, t in ends])  # (B, N, 3)
        source = source.expand_as(target)
        length_mm = (target - source).norm(dim=-1).reshape(-1)
        source_vox = self.drr.affine_inverse(source).reshape(-1, 3).double()
        target_vox = self.drr.affine_inverse(target).reshape(-1, 3).double()
        entry, exit_ = ray_box_interval(source_vox, target_vox, *self._box)
        if self._occupancy is not None:
            low, high = self._body_interval(source_vox, target_vox, entry, exit_, len(poses))
            entry, exit_ = torch.maximum(entry, low), torch.minimum(exit_, high)
        return _Rays(source_vox, target_vox, length_mm, entry, exit_)

    def _body_interval(
        self, source_vox: Tensor, target_vox: Tensor, entry: Tensor, exit_: Tensor, n_poses: int
    ) -> tuple[Tensor, Tensor]:
        """(R,) bounds of ``a`` outside which a ray meets only air, from one probe ray per block of pixels.

        The probe aims at the centre of a block of f x f pixels (the detector is a
        regular grid, so the centre is exact, also for blocks cut by the detector's
        edge). At a given ``a``, every ray of the block is within ``a (f - 1) / 2``
        pixel steps of the probe, so the probe's bounds hold for all of them while
        that distance, plus one voxel of trilinear support, is within what
        :class:`BodyOccupancy` covers.
        """
        occupancy = self._occupancy
        height, width = self.camera.height, self.camera.width
        hit = exit_ > entry
        if not bool(hit.any()):
            return entry, exit_
        targets = target_vox.view(n_poses, height, width, 3)
        origin = targets[:, :1, :1]  # (B, 1, 1, 3)
        step_row = targets[:, 1:2, :1] - origin if height > 1 else torch.zeros_like(origin)
        step_col = targets[:, :1, 1:2] - origin if width > 1 else torch.zeros_like(origin)
        pixel_reach = float((step_row.abs() + step_col.abs()).max()) * float(exit_[hit].max())  # voxels per pixel
        reach = occupancy.CELL * occupancy.DILATION - occupancy.CELL / 2 - 1.0  # voxels
        block = 16
        while block > 1 and (block - 1) / 2 * pixel_reach > reach:
            block //= 2
        rows = torch.arange(-(-height // block), dtype=torch.float64, device=self.device) * block + (block - 1) / 2
        cols = torch.arange(-(-width // block), dtype=torch.float64, device=self.device) * block + (block - 1) / 2
        centres = origin + rows[None, :, None, None] * step_row + cols[None, None, :, None] * step_col
        sources = source_vox.view(n_poses, height * width, 3)[:, :1].expand(n_poses, len(rows) * len(cols), 3)
        low, high = occupancy.interval(sources.reshape(-1, 3), centres.reshape(-1, 3))
        low, high = (
            v.view(n_poses, len(rows), len(cols)).repeat_interleave(block, 1).repeat_interleave(block, 2)
            for v in (low, high)
        )
        return low[:, :height, :width].reshape(-1), high[:, :height, :width].reshape(-1)

    def _sliced(self, rays: _Rays, n_poses: int) -> Tensor:
        """(R,) line integrals sampled on the slices each ray crosses, one pose at a time.

        A call samples the same slices for all the rays of a pose along one axis,
        so that a pose's image does not depend on the poses traced with it.
        """
        image = torch.empty(len(rays.length_mm), dtype=torch.float32, device=self.device)
        per_pose = len(rays.length_mm) // n_poses
        for pose in range(n_poses):
            ray = slice(pose * per_pose, (pose + 1) * per_pose)
            image[ray] = self._slices.integrate(
                rays.source_vox[ray],
                rays.target_vox[ray],
                rays.length_mm[ray],
                rays.entry[ray],
                rays.exit[ray],
                self._chunk_samples,
            )
        return image

    def _trilinear(self, rays: _Rays) -> Tensor:
        """(R,) line integrals, each ray sampled every ``step`` from its entry to just past its exit.

        A ray's ``n`` samples are cut into segments of ``m`` samples, each one batch
        entry of DiffDRR's ``Trilinear`` with its own ``alphamin``/``alphamax``, so
        one ``n_points`` serves rays of every length. Samples of a ray's last
        segment that fall past its exit lie outside the body, where the renderer
        reads zero (or air).
        """
        m = _SEGMENT_SAMPLES
        span = (rays.exit - rays.entry).clamp_min(0.0)
        if self.settings.n_points is not None:
            n = torch.full_like(span, self.settings.n_points, dtype=torch.int64)
            step = span / (self.settings.n_points - 1)
        else:
            # `step_voxels` in index space or `max_step_mm`, as fractions of the source-to-detector ray.
            step = torch.minimum(
                self.settings.step_voxels / (rays.target_vox - rays.source_vox).norm(dim=-1),
                self.settings.max_step_mm / rays.length_mm.double(),
            )
            n = torch.ceil(span / step).long() + 1
        n_segments = torch.where(rays.hit, (n + m - 1) // m, 0)
        ray_of = torch.repeat_interleave(torch.arange(len(span), device=self.device), n_segments)
        first_of_ray = torch.cumsum(n_segments, 0) - n_segments
        segment = torch.arange(len(ray_of), device=self.device) - first_of_ray[ray_of]

        partial = torch.empty(len(ray_of), dtype=torch.float32, device=self.device)
        per_call = max(1, self._chunk_samples // m)
        for start in range(0, len(ray_of), per_call):
            ray = ray_of[start : start + per_call]
            alphamin = rays.entry[ray] + (segment[start : start + per_call] * m) * step[ray]
            alphamax = alphamin + (m - 1) * step[ray]
            out = self._renderer(
                self.drr.density,
                rays.source_vox[ray, None].float(),
                rays.target_vox[ray, None].float(),
                rays.length_mm[ray, None, None],
                n_points=m,
                alphamin=alphamin[:, None, None].float(),
                alphamax=alphamax[:, None, None].float(),
            )
            partial[start : start + per_call] = out.reshape(-1)
        # Add up each ray's segments one after the other, without atomics, so that a
        # ray's value depends neither on the other rays in the pass nor on the device.
        table = torch.zeros(int(n_segments.max().clamp_min(1)), len(span), dtype=torch.float32, device=self.device)
        table[segment, ray_of] = partial
        image = table[0].clone()
        for column in table[1:]:
            image += column
        return image

    def _siddon(self, rays: _Rays) -> Tensor:
        """(R,) exact line integrals through every voxel, a chunk of rays per call."""
        image = torch.zeros(len(rays.length_mm), dtype=torch.float32, device=self.device)
        hit = torch.nonzero(rays.hit).flatten()
        per_call = max(1, self._chunk_samples // self._siddon_samples)
        for start in range(0, len(hit), per_call):
            ray = hit[start : start + per_call]
            out = self._renderer(
                self.drr.density,
                rays.source_vox[ray, None].float(),
                rays.target_vox[ray, None].float(),
                rays.length_mm[ray, None, None],
            )
            image[ray] = out.reshape(-1)
        return image

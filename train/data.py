"""Training samples read from a synth store: image, landmarks and heatmap targets at model resolution.

Geometry
    Every image is cropped (under augmentation) and resized to a square
    ``size`` x ``size`` model input, and its camera follows through
    :meth:`Camera.cropped` and :meth:`Camera.resized`; landmarks move with
    :meth:`Camera.pixels_to`. So ``geometry.project(landmarks_3d, pose,
    model_camera)`` is the returned ``landmarks_px``, augmented or not.
    Resizing is ``interpolate(mode="area")`` for an integer down-sampling
    factor and antialiased bilinear (``align_corners=False``) otherwise; both
    map pixel edges onto pixel edges, which is the convention of
    :meth:`Camera.resized`.
Normalisation
    Each model input is min-max scaled to [0, 1] over its own pixels (a
    constant image becomes all zeros). Line integrals are non-negative with a
    scale that depends on the subject and the pose; [0, 1] is the domain where
    a gamma augmentation is defined and keeps air at 0 under any gamma.
Augmentation
    ``basic``: a random crop, scale and shift (the camera follows), then gamma,
    contrast and Gaussian noise on the [0, 1] image. ``realistic``: the same
    crop, then a simulated C-arm detector on the line integrals before they
    are normalised, and a random 180° turn that turns the landmarks, camera
    and pose with the image (:mod:`pelmark.train.augment`).
Randomness
    Augmentation draws from a ``numpy.random.Generator`` seeded by
    ``(seed, "train-data", epoch, row)`` (and ``"train-realistic"`` for the
    realistic chain), so a sample depends on neither the number of DataLoader
    workers nor the order they run in.
Store access
    The constructor reads only the small ``split`` and ``subject_done`` arrays
    and the attributes; ``__getitem__`` reads one image chunk. The Zarr group
    is opened once per process (workers reopen it after a fork).
Device transforms
    Under ``DataSettings.device_transforms`` a sample stops after the read and
    the draws (the same draws); the trainer crops, resizes, normalises and
    augments the whole batch on its device (:mod:`pelmark.train.device_transforms`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.seeding import numpy_generator
from pelmark.store import Split, StoreReader, open_store
from pelmark.train.augment import (
    Augment,
    RealisticParams,
    RealisticRanges,
    realistic_image,
    sample_realistic,
    turned_camera_180,
    turned_points_180,
    turned_pose_180,
)

# Order of the values in a sample's ``intrinsics`` tensor.
INTRINSICS_FIELDS = ("fx", "fy", "cx_px", "cy_px", "sdd_mm", "sid_mm", "height", "width")


class TargetKind(str, enum.Enum):
    """Per-landmark training target."""

    DISK = "disk"  # 1 inside a disk, antialiased edge: the paper's segmentation-style masks
    GAUSSIAN = "gaussian"  # exp(-d^2 / 2 sigma^2), peak 1


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """How store images become model inputs and targets.

    Attributes:
        size: side of the square model input, in pixels.
        target: disk masks or Gaussian heatmaps.
        disk_radius_px: disk radius at model resolution.
        gaussian_sigma_px: Gaussian sigma at model resolution.
        splits: store splits to read.
        augment: none, basic (random crop and intensity changes) or realistic (the crop and a
            simulated detector, :mod:`pelmark.train.augment`); training only. True and False
            are basic and none.
        crop_scale: range of the crop side as a fraction of the image side.
        max_shift_frac: largest offset of the crop centre from the image
            centre, as a fraction of the image side (clipped so the crop stays
            inside the image).
        gamma_range: range of the gamma applied to the [0, 1] image.
        contrast_range: range of the contrast factor about the image mean.
        noise_std: standard deviation of additive Gaussian noise (0 = none; basic only).
        realistic: the ranges of the realistic chain.
        seed: root seed of the augmentation.
        targets: build the heatmap targets (evaluation needs none; the trainer draws them on the
            device instead when it runs on CUDA).
    """

    size: int = 512
    target: TargetKind = TargetKind.DISK
    disk_radius_px: float = 6.0
    gaussian_sigma_px: float = 3.0
    splits: tuple[Split, ...] = (Split.TRAIN,)
    augment: Augment = Augment.NONE
    crop_scale: tuple[float, float] = (0.8, 1.0)
    max_shift_frac: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_range: tuple[float, float] = (0.8, 1.2)
    noise_std: float = 0.02
    realistic: RealisticRanges = RealisticRanges()
    seed: int = 42
    targets: bool = True
    # Also read each image's bone label map (the store's ``segmentation``), cropped like the image and
    # resized by nearest neighbour: ``segmentation`` in a sample (for the seg-informed strategy).
    segmentation: bool = False
    # The workers only read: a sample holds the store image, its labels and the draws, and the trainer makes
    # the model inputs of a whole batch on its device (pelmark.train.device_transforms).
    device_transforms: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", Augment.parse(self.augment))
        if self.size < 1:
            raise PelmarkError(f"data size must be positive, got {self.size}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise PelmarkError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.gamma_range[0] <= 0.0 or self.gamma_range[0] > self.gamma_range[1]:
            raise PelmarkError(f"gamma_range must be positive and ordered, got {self.gamma_range}")
        if self.contrast_range[0] > self.contrast_range[1]:
            raise PelmarkError(f"contrast_range must be ordered, got {self.contrast_range}")
        if self.disk_radius_px <= 0.0 or self.gaussian_sigma_px <= 0.0 or self.noise_std < 0.0:
            raise PelmarkError("disk_radius_px and gaussian_sigma_px must be positive, noise_std non-negative")
        if not self.splits:
            raise PelmarkError("no splits were asked for")
        if self.device_transforms and self.augment is Augment.REALISTIC:
            raise PelmarkError("the realistic augmentation runs in the DataLoader workers only: use transforms worker (or auto)")


def intrinsics_tensor(camera: Camera) -> Tensor:
    """The camera as float64 values in the order of :data:`INTRINSICS_FIELDS`."""
    return torch.tensor(
        [camera.fx, camera.fy, camera.cx_px, camera.cy_px, camera.sdd_mm, camera.sid_mm, camera.height, camera.width],
        dtype=torch.float64,
    )


def camera_from_intrinsics(values: Tensor) -> Camera:
    """Inverse of :func:`intrinsics_tensor` for one camera (8 values)."""
    fx, fy, cx, cy, sdd, sid, height, width = (float(v) for v in values.tolist())
    return Camera(
        height=round(height),
        width=round(width),
        sdd_mm=sdd,
        sid_mm=sid,
        spacing_x_mm=sdd / fx,
        spacing_y_mm=sdd / fy,
        cx_px=cx,
        cy_px=cy,
    )


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """Resample an (H, W) image to (height, width), pixel edges onto pixel edges (see :meth:`Camera.resized`)."""
    src_h, src_w = image.shape
    batch = image[None, None]
    if src_h % height == 0 and src_w % width == 0:
        out = F.interpolate(batch, size=(height, width), mode="area")
    else:
        out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0]


def normalise_image(image: Tensor) -> Tensor:
    """Min-max scale to [0, 1]; a constant image becomes zeros."""
    low, high = image.min(), image.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(image)
    return (image - low) / span


# exp(-d²/2σ²) rounds to 0 in float32 (below half its smallest subnormal, 2^-150) beyond d = 14.43 σ.
_GAUSSIAN_REACH_SIGMAS = 14.5


def heatmap_targets(
    landmarks_px: Tensor, visible: Tensor, height: int, width: int, settings: DataSettings
) -> Tensor:
    """(..., L, height, width) float32 targets, on the landmarks' device; invisible landmarks get all zeros.

    A disk is 1 where a pixel centre lies more than half a pixel inside the
    circle, 0 more than half a pixel outside, and linear in between (about the
    pixel's area coverage), so its mass is close to pi r^2 and its centroid
    follows sub-pixel landmark positions. A Gaussian is exp(-d²/2σ²), peak 1.

    Each map is computed only on the square window around its landmark outside
    which it is 0 in float32 (radius r + 1/2 for a disk, 14.5 σ for a Gaussian),
    in float64 from the same formula at the same pixel centres, and then written
    into zeros: the maps are those of the whole image, value for value, at a
    small part of the cost (and batched over any leading dimensions).

    Args:
        landmarks_px: (..., L, 2) x = column, y = row.
        visible: (..., L) bool.
        height, width: size of the maps.
        settings: the target kind and its radius or sigma.
    """
    device = landmarks_px.device
    points = landmarks_px.to(torch.float64)
    finite = torch.isfinite(points).all(-1)
    points = torch.where(finite[..., None], points, 0.0)
    shape = points.shape[:-1]
    if settings.target is TargetKind.DISK:
        reach = math.ceil(settings.disk_radius_px + 0.5)
    else:
        reach = math.ceil(_GAUSSIAN_REACH_SIGMAS * settings.gaussian_sigma_px)
    # The window starts `reach` before the landmark's pixel, shifted to lie inside the image
    # (which keeps every pixel of the image within reach of the landmark in it).
    window_h, window_w = min(2 * reach + 2, height), min(2 * reach + 2, width)
    top = (points[..., 1].floor().clamp(-(2**31), 2**31) - reach).long().clamp(0, height - window_h)
    left = (points[..., 0].floor().clamp(-(2**31), 2**31) - reach).long().clamp(0, width - window_w)
    rows = top[..., None] + torch.arange(window_h, device=device)  # (..., L, Kh)
    cols = left[..., None] + torch.arange(window_w, device=device)  # (..., L, Kw)
    dy = rows.to(torch.float64) - points[..., 1, None]
    dx = cols.to(torch.float64) - points[..., 0, None]
    dist2 = dx[..., None, :].square() + dy[..., :, None].square()
    if settings.target is TargetKind.DISK:
        maps = (settings.disk_radius_px + 0.5 - dist2.sqrt()).clamp(0.0, 1.0)
    else:
        maps = torch.exp(-dist2 / (2.0 * settings.gaussian_sigma_px**2))
    maps = (maps * (visible & finite).to(maps.dtype)[..., None, None]).to(torch.float32)
    index = (rows[..., :, None] * width + cols[..., None, :]).reshape(-1, window_h * window_w)
    out = torch.zeros(index.shape[0], height * width, dtype=torch.float32, device=device)
    out.scatter_(1, index, maps.reshape(index.shape))
    return out.reshape(*shape, height, width)


@dataclasses.dataclass(frozen=True)
class CropParams:
    """A crop of the store image, in store pixels; the whole image when not augmenting."""

    top: int
    left: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class IntensityParams:
    gamma: float
    contrast: float
    noise_seed: int


class StoreDataset(Dataset):
    """Samples of the rows of a synth store whose split is in ``settings.splits``.

    Only rows of finished subjects (``subject_done``) are used.

    Args:
        store_path: the Zarr store written by ``pelmark synth``.
        settings: model size, targets, splits and augmentation.
        indices: optional store rows to restrict to (each must be one of the
            rows above), e.g. a hold-out of subjects.

    A sample is a dict:
        image: (1, S, S) float32 in [0, 1] (before noise).
        landmarks_px: (L, 2) float32, x = column, y = row at model resolution.
        visible: (L,) bool, visible in the store and inside the model image.
        heatmap_target: (L, S, S) float32 (an empty tensor when ``settings.targets`` is off).
        pose: (6,) float64 θ.
        landmarks_3d: (L, 3) float32 world mm.
        intrinsics: (8,) float64 model camera, order :data:`INTRINSICS_FIELDS`
            (:func:`camera_from_intrinsics` inverts it).
        index: the store row.
        segmentation: (S, S) int64 bone labels (an empty tensor unless ``settings.segmentation``).

    Under ``settings.device_transforms`` ``image`` and ``segmentation`` are left to the trainer
    (:mod:`pelmark.train.device_transforms`), and a sample holds instead:
        store_image: (H, W) the store image, uncropped, in the store's dtype.
        crop: (4,) int64 top, left, height, width of the crop in store pixels.
        intensity: (2,) float64 ``basic``'s gamma and contrast (empty otherwise).
        noise: (S, S) float32 ``basic``'s standard normal noise (empty otherwise).
        store_segmentation: (H, W) uint8 the store's bone labels (empty unless ``settings.segmentation``).
    """

    def __init__(self, store_path: str | Path, settings: DataSettings, indices: list[int] | np.ndarray | None = None):
        self.store_path = Path(store_path)
        self.settings = settings
        self.epoch = 0
        self._group = None
        self._group_pid: int | None = None
        reader = StoreReader(self.store_path, self._store())
        self.camera = reader.camera
        self.landmark_names = reader.landmark_names
        rows = reader.rows(settings.splits)
        labels = "/".join(Split(s).label for s in settings.splits)
        if len(rows) == 0:
            raise PelmarkError(f"store has no {labels} images (from finished subjects)", self.store_path)
        if indices is not None:
            requested = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = requested[~np.isin(requested, rows)]
            if len(bad):
                raise PelmarkError(f"rows {bad[:5].tolist()} are not {labels} rows of finished subjects", self.store_path)
            rows = requested
        self.rows = rows

    # ------------------------------------------------------------ store handle

    def _store(self):
        """The Zarr group, opened once per process (a handle is not shared across a fork)."""
        pid = os.getpid()
        if self._group is None or self._group_pid != pid:
            self._group = open_store(self.store_path)
            self._group_pid = pid
        return self._group

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_group"] = None
        state["_group_pid"] = None
        return state

    # ------------------------------------------------------------ sampling

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw; call before iterating a DataLoader (not with persistent workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def sample_params(self, row: int) -> tuple[CropParams, IntensityParams | None]:
        """The crop and intensity changes of store ``row`` in the current epoch (no image needed)."""
        height, width = self.camera.height, self.camera.width
        s = self.settings
        if s.augment is Augment.NONE:
            return CropParams(0, 0, height, width), None
        rng = numpy_generator(s.seed, "train-data", self.epoch, int(row))
        scale = rng.uniform(*s.crop_scale)
        shift = rng.uniform(-s.max_shift_frac, s.max_shift_frac, size=2)
        gamma = rng.uniform(*s.gamma_range)
        contrast = rng.uniform(*s.contrast_range)
        noise_seed = int(rng.integers(0, 2**63 - 1))
        crop_h = min(height, max(1, round(scale * height)))
        crop_w = min(width, max(1, round(scale * width)))
        top = round((height - crop_h) / 2 + shift[0] * height)
        left = round((width - crop_w) / 2 + shift[1] * width)
        top = int(np.clip(top, 0, height - crop_h))
        left = int(np.clip(left, 0, width - crop_w))
        return CropParams(top, left, crop_h, crop_w), IntensityParams(gamma, contrast, noise_seed)

    def realistic_params(self, row: int) -> RealisticParams | None:
        """The realistic chain's draw for store ``row`` in the current epoch; None unless ``augment`` is realistic."""
        s = self.settings
        if s.augment is not Augment.REALISTIC:
            return None
        rng = numpy_generator(s.seed, "train-realistic", self.epoch, int(row))
        return sample_realistic(rng, s.realistic, s.gamma_range, s.contrast_range)

    def model_camera(self, crop: CropParams) -> Camera:
        size = self.settings.size
        return self.camera.cropped(crop.top, crop.left, crop.height, crop.width).resized(size, size)

    def _apply_intensity(self, image: Tensor, params: IntensityParams) -> Tensor:
        image = image.clamp(0.0, 1.0).pow(params.gamma)
        mean = image.mean()
        image = (image - mean) * params.contrast + mean
        if self.settings.noise_std > 0:
            image = image + self.settings.noise_std * self._noise(params, image.shape)
        return image

    @staticmethod
    def _noise(params: IntensityParams, shape: tuple[int, ...]) -> Tensor:
        """``basic``'s standard normal noise field, numpy's stream from the draw's seed."""
        return torch.from_numpy(np.random.default_rng(params.noise_seed).standard_normal(shape, dtype=np.float32))

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        group = self._store()
        crop, intensity = self.sample_params(row)
        realistic = self.realistic_params(row)
        size = self.settings.size
        camera = self.model_camera(crop)

        if self.settings.device_transforms:
            return self._store_sample(group, row, crop, intensity, camera)

        image = torch.from_numpy(np.asarray(group["images"][row], dtype=np.float32))
        image = resize_image(image[crop.top : crop.top + crop.height, crop.left : crop.left + crop.width], size, size)
        if realistic is not None:
            image = realistic_image(image, realistic, camera.spacing_x_mm * camera.spacing_y_mm)
        else:
            image = normalise_image(image)
            if intensity is not None:
                image = self._apply_intensity(image, intensity)

        labels = self._labels(group, row, crop) if self.settings.segmentation else torch.zeros(0)
        turned = realistic is not None and realistic.rot180
        if turned:  # the whole geometry turns with the image (see _geometry)
            image = image.flip(-2, -1)
            labels = labels.flip(-2, -1) if self.settings.segmentation else labels
        return {"image": image[None].to(torch.float32).contiguous(), **self._geometry(group, row, camera, turned), "segmentation": labels}

    def _geometry(self, group, row: int, camera: Camera, turned: bool = False) -> dict[str, Any]:
        """A sample's landmarks, visibility, targets, pose, CT landmarks and camera under model ``camera``.

        ``turned``: the image was turned by 180°, and the whole geometry turns with it, so that
        projection still gives ``landmarks_px``.
        """
        size = self.settings.size
        store_px = torch.from_numpy(np.asarray(group["landmarks_2d"][row], dtype=np.float64))
        landmarks_px = self.camera.pixels_to(camera, store_px)
        pose = torch.from_numpy(np.asarray(group["pose"][row], dtype=np.float64))
        if turned:
            landmarks_px = turned_points_180(landmarks_px, camera)
            pose = turned_pose_180(pose, camera)
            camera = turned_camera_180(camera)
        visible = torch.from_numpy(np.asarray(group["visible"][row], dtype=bool)) & camera.contains(landmarks_px)
        return {
            "landmarks_px": landmarks_px.to(torch.float32),
            "visible": visible,
            "heatmap_target": (
                heatmap_targets(landmarks_px, visible, size, size, self.settings)
                if self.settings.targets
                else torch.zeros(0)
            ),
            "pose": pose,
            "landmarks_3d": torch.from_numpy(np.asarray(group["landmarks_3d"][row], dtype=np.float32)),
            "intrinsics": intrinsics_tensor(camera),
            "index": row,
        }

    def _store_sample(self, group, row: int, crop: CropParams, intensity: IntensityParams | None, camera: Camera) -> dict[str, Any]:
        """The sample of ``device_transforms``: what the store holds, the draws, and the landmarks as above.

        The image and the labels are the store's, uncropped (so the images of a batch stack) and in the
        store's dtype; :func:`pelmark.train.device_transforms.model_inputs` makes them into the sample's
        ``image`` and ``segmentation``. Landmarks, visibility, pose and camera are those of ``__getitem__``:
        a few points, from the same :meth:`_geometry`.
        """
        size = self.settings.size
        noise = torch.zeros(0)
        if intensity is not None and self.settings.noise_std > 0:
            noise = self._noise(intensity, (size, size))
        if self.settings.segmentation:
            self._check_labels(group)
            labels = torch.from_numpy(np.asarray(group["segmentation"][row], dtype=np.uint8))
        else:
            labels = torch.zeros(0)  # as the worker path's empty labels
        return {
            "store_image": torch.from_numpy(np.asarray(group["images"][row])),
            "crop": torch.tensor([crop.top, crop.left, crop.height, crop.width], dtype=torch.int64),
            "intensity": torch.tensor([intensity.gamma, intensity.contrast] if intensity is not None else [], dtype=torch.float64),
            "noise": noise,
            "store_segmentation": labels,
            **self._geometry(group, row, camera),
        }

    def _check_labels(self, group) -> None:
        if "segmentation" not in group:
            raise PelmarkError("store has no bone labels ('segmentation'); synthesise it from a manifest with [dataset] classes", self.store_path)

    def _labels(self, group, row: int, crop: CropParams) -> Tensor:
        """(S, S) int64 bone labels of store ``row`` under ``crop``, resized by nearest neighbour at pixel centres.

        ``nearest-exact`` takes the source pixel whose centre is closest to each output pixel's centre,
        the pixel-edge-to-pixel-edge convention of :func:`resize_image`.
        """
        self._check_labels(group)
        labels = torch.from_numpy(np.asarray(group["segmentation"][row], dtype=np.uint8))
        labels = labels[crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
        size = self.settings.size
        resized = F.interpolate(labels[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0]
        return resized.to(torch.int64)

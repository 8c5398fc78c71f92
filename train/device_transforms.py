"""The device half of the data pipeline: crop, resize, normalisation and ``basic`` augmentation, for a whole batch.

``transforms`` (a ``[train]`` key and ``pelmark train --transforms``) is one of
:class:`Transforms`. ``worker`` is the pipeline of :mod:`pelmark.train.data`:
each DataLoader worker crops, resizes, normalises and augments its images.
``device`` leaves the workers only the reading: the store image as stored
(uncropped, so that the images of a batch share one shape, and in the store's
dtype, float16 by default), its bone labels and landmark arrays, the landmark geometry (a few
points) and the sample's draws, which :meth:`StoreDataset.sample_params`
makes exactly as for ``worker`` from the same ``(seed, epoch, row)``
generator. The trainer then makes the model inputs of the batch on its device
with the functions below, and draws the heatmap targets there. ``auto`` is
``device`` on CUDA and ``worker`` on a CPU, where a CPU run is then what it
was, bit for bit.

Crop and resize: one matrix product per axis
    :func:`pelmark.train.data.resize_image` is separable and linear: area (a box
    of ``factor`` pixels) for an integer down-sampling factor, else PyTorch's
    antialiased bilinear (a triangle filter widened by the factor, its weights
    normalised per output pixel). So the crop and resize of sample ``b`` along
    one axis is a (size x store side) matrix ``R_b`` that is zero outside the
    crop's columns, and the batch is ``R_y @ image @ R_x^T``: two batched
    matrix products on the uncropped store images. The weights are PyTorch's,
    bit for bit: :func:`_antialias_weights` reproduces ``aten``'s
    ``_compute_indices_min_size_weights_aa`` for float32, its mixed float and
    double steps included (tested against ``F.interpolate`` itself). What is
    left is the order of the float32 sums (and, for area, dividing once per
    axis instead of once by the block's size): on CPU a few 1e-7 of the image's
    range (tested: within 1e-5 after normalisation and the ``basic`` changes).

    ``grid_sample`` on an affine grid (or a roi-align) was the other candidate:
    it reads the 4 nearest pixels of each output pixel and has no antialiasing,
    so it differs from :func:`resize_image` by aliased detail, not by rounding:
    up to 8e-3 (mean 4.5e-4) of the [0, 1] range on the phantom's 768² DRRs
    cropped and resized to 512², against 3e-7 here, and more on a noisy image
    or a coarser resize.

    Cost: the dense products take about 1 GFLOP an image from 768² to 512²
    (some tens of µs on an H100-class GPU's float32 units: estimated, not
    measured), several times the separable resize's work; on a CPU they are
    slower than the workers' resize, one reason ``auto`` keeps CPU runs there.

Normalisation and ``basic``
    Per image, the arithmetic of :func:`pelmark.train.data.normalise_image`
    and ``StoreDataset._apply_intensity`` on a batch. The Gaussian noise is
    numpy's stream from the sample's ``noise_seed``, which only a CPU can
    draw: the workers draw it (about 3.6 ms an image at 512² on one core) and
    the device adds it, so both paths add the same noise.

``realistic``
    Not here: its Poisson counts are numpy's draws on each image's own expected
    counts, and its low-pass grids differ in size per draw. ``auto`` keeps it
    on the workers and ``device`` refuses it (one line).

Bone labels
    Nearest-exact, as ``StoreDataset._labels``: :func:`_nearest_exact_index`
    reproduces the source index of ``F.interpolate(mode="nearest-exact")``
    (tested), and the labels are gathered from the uncropped map.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from pelmark.train.augment import Augment
from pelmark.train.data import DataSettings

# What a sample carries under ``device`` instead of ``image`` and ``segmentation`` (see StoreDataset).
RAW_KEYS = ("store_image", "crop", "intensity", "noise", "store_segmentation")


class Transforms(str, enum.Enum):
    """Where the crop, resize, normalisation and ``basic`` augmentation run (module docstring)."""

    AUTO = "auto"  # device on CUDA, worker on a CPU and for the realistic augmentation
    WORKER = "worker"  # in each DataLoader worker, per image (pelmark.train.data)
    DEVICE = "device"  # in the trainer, on its device, per batch (this module)


def resolve_transforms(setting: Transforms | str, device: torch.device, augment: Augment) -> Transforms:
    """``worker`` or ``device`` for a run on ``device`` with ``augment``; ``auto`` is device on CUDA unless realistic."""
    setting = Transforms(setting)
    if setting is not Transforms.AUTO:
        return setting
    on_cuda = device.type == "cuda"
    return Transforms.DEVICE if on_cuda and Augment.parse(augment) is not Augment.REALISTIC else Transforms.WORKER


# ---------------------------------------------------------------- crop and resize


def _antialias_weights(length: Tensor, size: int, taps: int) -> tuple[Tensor, Tensor]:
    """PyTorch's antialiased bilinear weights from ``length`` input pixels to ``size``, per sample.

    The float32 steps of ``aten``'s ``_compute_indices_min_size_weights_aa`` (UpSampleKernel.cpp),
    where a ``float`` meets a ``double`` literal the sum is a double, rounded when it is stored.

    Args:
        length: (B,) int64 input sides.
        size: output side.
        taps: weights kept per output pixel (at least 2 x ceil(largest factor) + 1).

    Returns:
        (B, size) int64 first input pixel of each output pixel, and (B, size, taps) float32 weights
        (0 past the pixel's support).
    """
    f32, f64 = torch.float32, torch.float64
    scale = length.to(f32) / size
    one = torch.ones((), dtype=f32, device=length.device)
    support = torch.where(scale >= 1, scale, one)
    invscale = torch.where(scale >= 1, (1.0 / scale.to(f64)).to(f32), one)
    index = torch.arange(size, dtype=f64, device=length.device)
    center = (scale.to(f64)[:, None] * (index + 0.5)).to(f32)
    first = ((center - support[:, None]).to(f64) + 0.5).trunc().long().clamp_min(0)
    stop = torch.minimum(((center + support[:, None]).to(f64) + 0.5).trunc().long(), length[:, None])
    count = (stop - first).clamp(0, taps)
    k = torch.arange(taps, device=length.device)
    offset = (first[..., None] + k).to(f32) - center[..., None]
    x = ((offset.to(f64) + 0.5) * invscale.to(f64)[:, None, None]).to(f32).abs()
    zero = torch.zeros((), dtype=f32, device=length.device)
    weights = torch.where((x < 1) & (k < count[..., None]), (1.0 - x.to(f64)).to(f32), zero)
    total = torch.zeros_like(weights[..., 0])
    for tap in range(taps):  # in order, as aten sums them
        total = total + weights[..., tap]
    weights = torch.where(total[..., None] != 0, weights / total[..., None], weights)
    return first, weights


def resampling_matrices(start: Tensor, length: Tensor, store_side: int, size: int) -> Tensor:
    """(B, size, store_side) float32: crop ``[start, start + length)`` of a store axis, resized to ``size``.

    Row i holds the weights of output pixel i over the store's pixels, as
    :func:`~pelmark.train.data.resize_image` applies them: area (1/factor over a
    block) when ``length`` is a multiple of ``size``, antialiased bilinear otherwise.
    """
    taps = 2 * math.ceil(max(store_side / size, 1.0)) + 1
    first, weights = _antialias_weights(length, size, taps)
    factor = torch.div(length, size, rounding_mode="floor")
    area = (length % size == 0)[:, None]
    k = torch.arange(taps, device=length.device)
    box = torch.where(k < factor[:, None, None], (1.0 / factor.to(torch.float64)).to(torch.float32)[:, None, None], 0.0)
    first = torch.where(area, torch.arange(size, device=length.device) * factor[:, None], first)
    weights = torch.where(area[..., None], box.expand_as(weights), weights)
    columns = (start[:, None, None] + first[..., None] + k).clamp_max(store_side - 1)  # past the support: weight 0
    matrices = torch.zeros(len(length), size, store_side, dtype=torch.float32, device=length.device)
    return matrices.scatter_add_(2, columns, weights)


def crop_resize(store_images: Tensor, crops: Tensor, size: int) -> Tensor:
    """(B, size, size) float32 from (B, H, W) store images and (B, 4) crops (top, left, height, width).

    The products are float32: with TF32 matmuls switched on (PyTorch's default is off;
    ``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision``) CUDA
    would round the weights and pixels to 10-bit mantissas, some 1e-3 of the range.
    """
    _, height, width = store_images.shape
    crops = crops.long()
    rows = resampling_matrices(crops[:, 0], crops[:, 2], height, size)
    cols = resampling_matrices(crops[:, 1], crops[:, 3], width, size)
    # The width first, then the height, as aten's separable kernel.
    return rows @ (store_images.to(torch.float32) @ cols.transpose(1, 2))


# ---------------------------------------------------------------- intensities


def normalise(images: Tensor) -> Tensor:
    """Each (..., H, W) image min-max scaled to [0, 1] (a constant one to zeros), as ``normalise_image``."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    scaled = (images - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(images))


def basic_intensity(images: Tensor, gamma: Tensor, contrast: Tensor, noise: Tensor | None, noise_std: float) -> Tensor:
    """``basic``'s gamma, contrast and noise on (B, H, W) images in [0, 1], with (B,) gamma and contrast."""
    images = images.clamp(0.0, 1.0).pow(gamma.to(images.dtype)[:, None, None])
    mean = images.mean(dim=(-2, -1), keepdim=True)
    images = (images - mean) * contrast.to(images.dtype)[:, None, None] + mean
    if noise is not None and noise_std > 0:
        images = images + noise_std * noise
    return images


# ---------------------------------------------------------------- bone labels


def _nearest_exact_index(length: Tensor, size: int) -> Tensor:
    """(B, size) int64: the input pixel ``F.interpolate(mode="nearest-exact")`` takes for each output pixel.

    aten's ``nearest_neighbor_exact_compute_source_index``: ``floorf((i + 0.5) * scale)`` with a float32
    scale and the product in double, at most ``length - 1``.
    """
    scale = length.to(torch.float32) / size
    index = torch.arange(size, dtype=torch.float64, device=length.device)
    source = ((index + 0.5) * scale.to(torch.float64)[:, None]).to(torch.float32).floor().long()
    return torch.minimum(source, length[:, None] - 1)


def crop_resize_labels(store_labels: Tensor, crops: Tensor, size: int) -> Tensor:
    """(B, size, size) int64 bone labels from (B, H, W) store label maps, nearest-exact as ``StoreDataset._labels``."""
    crops = crops.long()
    rows = crops[:, 0, None] + _nearest_exact_index(crops[:, 2], size)
    cols = crops[:, 1, None] + _nearest_exact_index(crops[:, 3], size)
    batch = torch.arange(len(crops), device=crops.device)[:, None, None]
    return store_labels[batch, rows[:, :, None], cols[:, None, :]].long()


# ---------------------------------------------------------------- a batch


def model_inputs(batch: Mapping[str, Any], settings: DataSettings) -> dict[str, Any]:
    """The batch of a ``device_transforms`` dataset with its model inputs made, on the batch's device.

    ``image`` (B, 1, S, S) float32 and ``segmentation`` (B, S, S) int64 (or (B, 0) without labels)
    replace the store images, labels and draws; the other entries are passed on.
    """
    size = settings.size
    images = normalise(crop_resize(batch["store_image"], batch["crop"], size))
    if settings.augment is Augment.BASIC:
        intensity = batch["intensity"]
        noise = batch["noise"] if settings.noise_std > 0 else None
        images = basic_intensity(images, intensity[:, 0], intensity[:, 1], noise, settings.noise_std)
    elif settings.augment is not Augment.NONE:
        raise ValueError(f"the {settings.augment.value} augmentation is not made on the device")
    out = {k: v for k, v in batch.items() if k not in RAW_KEYS}
    out["image"] = images[:, None].contiguous()
    if settings.segmentation:
        out["segmentation"] = crop_resize_labels(batch["store_segmentation"], batch["crop"], size)
    else:
        out["segmentation"] = batch["store_segmentation"]
    return out

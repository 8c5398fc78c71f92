"""pelmark.train.data: samples, exact landmark geometry at model resolution, targets, determinism."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cohort_fixtures import write_bead_store
from pelmark import geometry
from pelmark.errors import PelmarkError
from pelmark.store import Split, open_store
from pelmark.train import data as data_mod
from pelmark.train.data import (
    DataSettings,
    StoreDataset,
    TargetKind,
    camera_from_intrinsics,
    heatmap_targets,
    resize_image,
)

AUG = dict(augment=True, crop_scale=(0.6, 0.9), max_shift_frac=0.2)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """3 bead subjects (the last novel_subject) x 4 views of 48 x 48."""
    return write_bead_store(tmp_path_factory.mktemp("cohort"))


def _copy(store: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(store, target)
    return target


def _project(sample) -> torch.Tensor:
    camera = camera_from_intrinsics(sample["intrinsics"])
    points = sample["landmarks_3d"].to(torch.float64)[None]
    return geometry.project(points, sample["pose"][None], camera)[0]


def test_shapes_and_dtypes(store):
    ds = StoreDataset(store, DataSettings(size=24))
    sample = ds[0]
    n = len(ds.landmark_names)
    assert n == 5
    expected = {
        "image": ((1, 24, 24), torch.float32),
        "landmarks_px": ((n, 2), torch.float32),
        "visible": ((n,), torch.bool),
        "heatmap_target": ((n, 24, 24), torch.float32),
        "pose": ((6,), torch.float64),
        "landmarks_3d": ((n, 3), torch.float32),
        "intrinsics": ((8,), torch.float64),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(sample[key].shape) == shape, key
        assert sample[key].dtype == dtype, key
    assert isinstance(sample["index"], int)
    assert sample["image"].min() == 0.0 and sample["image"].max() == 1.0


def test_reads_only_requested_splits(store):
    split = np.asarray(open_store(store)["split"][:])
    train = StoreDataset(store, DataSettings(size=24))
    assert len(train) == int((split == Split.TRAIN).sum()) > 0
    assert all(split[row] == Split.TRAIN for row in train.rows)
    novel = StoreDataset(store, DataSettings(size=24, splits=(Split.NOVEL_VIEW, Split.NOVEL_SUBJECT)))
    assert set(split[novel.rows]) == {Split.NOVEL_VIEW, Split.NOVEL_SUBJECT}
    assert set(train.rows).isdisjoint(novel.rows)


def test_unfinished_subject_rows_are_skipped(store, tmp_path):
    copy = _copy(store, tmp_path)
    group = open_store(copy, mode="r+")
    group["subject_done"][0] = False
    views = group["split"].shape[0] // group["subject_done"].shape[0]
    ds = StoreDataset(copy, DataSettings(size=24))
    assert len(ds) > 0 and ds.rows.min() >= views


def test_no_train_rows_is_a_one_line_error(store, tmp_path):
    copy = _copy(store, tmp_path)
    group = open_store(copy, mode="r+")
    group["split"][:] = np.full(group["split"].shape, int(Split.NOVEL_VIEW), dtype=np.uint8)
    with pytest.raises(PelmarkError, match="store has no train images") as err:
        StoreDataset(copy, DataSettings(size=24))
    assert err.value.path == copy


def test_indices_restrict_and_are_checked(store):
    full = StoreDataset(store, DataSettings(size=24))
    sub = StoreDataset(store, DataSettings(size=24), indices=full.rows[1:3])
    assert [sub[i]["index"] for i in range(len(sub))] == full.rows[1:3].tolist()
    novel = StoreDataset(store, DataSettings(size=24, splits=(Split.NOVEL_SUBJECT,)))
    with pytest.raises(PelmarkError, match="not train rows"):
        StoreDataset(store, DataSettings(size=24), indices=novel.rows[:1])


@pytest.mark.parametrize("size", [24, 32, 64])  # area (factor 2), antialiased bilinear down, bilinear up
@pytest.mark.parametrize("augment", [False, True])
def test_landmarks_equal_projection_at_model_camera(store, size, augment):
    ds = StoreDataset(store, DataSettings(size=size, **(AUG if augment else {})))
    for i in range(len(ds)):
        sample = ds[i]
        torch.testing.assert_close(sample["landmarks_px"].double(), _project(sample), atol=1e-3, rtol=0)
        camera = camera_from_intrinsics(sample["intrinsics"])
        assert (camera.height, camera.width) == (size, size)
        assert torch.equal(sample["visible"] & ~camera.contains(sample["landmarks_px"]), torch.zeros_like(sample["visible"]))


@pytest.mark.parametrize("size", [24, 32, 64])
@pytest.mark.parametrize("augment", [False, True])
def test_bright_block_lands_on_mapped_landmark(store, tmp_path, size, augment):
    """A 2x2 bright block in the store image: its centroid after crop+resize is the mapped landmark.

    Area pooling (48 -> 24) and antialiased down-sampling of the whole image (48 -> 32) keep the
    centroid exactly; up-sampling and odd crop sizes alias a hard-edged block by up to ~0.03 px, far
    below the 0.17-0.35 px that a pixel-corner or align_corners=True convention error would give.
    Gamma is fixed at 1 because it is not linear in intensity.
    """
    copy = _copy(store, tmp_path)
    group = open_store(copy, mode="r+")
    aug = dict(AUG, gamma_range=(1.0, 1.0)) if augment else {}
    ds = StoreDataset(copy, DataSettings(size=size, noise_std=0.0, **aug))
    row = int(ds.rows[0])
    image = np.zeros(group["images"].shape[1:], dtype=np.float16)
    image[22:24, 26:28] = 100.0  # centre (x=26.5, y=22.5), inside any crop of AUG around the centre
    group["images"][row] = image
    points = np.asarray(group["landmarks_2d"][row])
    points[0] = (26.5, 22.5)
    group["landmarks_2d"][row] = points

    sample = ds[0]
    assert sample["index"] == row
    img = sample["image"][0].double()
    if augment:  # undo the intensity changes' offset: the background is the most common value
        img = (img - img.flatten().mode().values).clamp_min(0.0)
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    centroid = torch.stack([(img * cols).sum() / img.sum(), (img * rows).sum() / img.sum()])
    exact = not augment and size in (24, 32)
    torch.testing.assert_close(centroid, sample["landmarks_px"][0].double(), atol=1e-4 if exact else 0.05, rtol=0)


def test_area_resize_is_block_average():
    image = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    # Block means of the 2x2 blocks: (0+1+4+5)/4 = 2.5, etc.
    torch.testing.assert_close(resize_image(image, 2, 2), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


@st.composite
def crops_and_sizes(draw):
    """A store image size, a crop window on it, and the size the crop is resized to."""
    height, width = draw(st.integers(4, 48)), draw(st.integers(4, 48))
    crop_h, crop_w = draw(st.integers(4, height)), draw(st.integers(4, width))
    top, left = draw(st.integers(0, height - crop_h)), draw(st.integers(0, width - crop_w))
    return (height, width), (top, left, crop_h, crop_w), (draw(st.integers(4, 64)), draw(st.integers(4, 64)))


@settings(max_examples=60, deadline=None)
@given(setup=crops_and_sizes())
def test_crop_then_resize_image_agrees_with_the_model_camera(setup):
    # Images whose pixels hold their own store column (x) or row (y): after slicing and
    # resize_image, each model pixel holds the store coordinate it samples, which must be
    # where model.pixels_to(store) sends that pixel's centre.
    (height, width), (top, left, crop_h, crop_w), (size_h, size_w) = setup
    store = geometry.Camera.centered(height, width, spacing_mm=1.0)
    model = store.cropped(top, left, crop_h, crop_w).resized(size_h, size_w)
    ramp_x = torch.arange(width, dtype=torch.float32).expand(height, width)
    ramp_y = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    seen_x = resize_image(ramp_x[window], size_h, size_w)
    seen_y = resize_image(ramp_y[window], size_h, size_w)
    cols, rows = torch.arange(size_w, dtype=torch.float64), torch.arange(size_h, dtype=torch.float64)
    want_x = model.pixels_to(store, torch.stack([cols, torch.zeros_like(cols)], dim=-1))[:, 0]
    want_y = model.pixels_to(store, torch.stack([torch.zeros_like(rows), rows], dim=-1))[:, 1]

    def interior_and_tolerance(want, start, crop, size):
        # Area averaging (whole-number shrinking) and bilinear enlarging give the ramp back exactly.
        # Shrinking by other factors, the antialiasing filter is a tent sampled on whole source pixels,
        # which brings a straight ramp back to within 0.09 source px (zero on average); and only where
        # the crop's edge does not cut the tent, whose half-width is crop / size source pixels.
        area = crop_h % size_h == 0 and crop_w % size_w == 0
        reach = 0.0 if area else max(crop / size, 1.0)
        keep = (want - start >= reach) & (want - start <= crop - 1 - reach)
        return keep, (1e-3 if area or crop <= size else 0.1)

    keep_x, tol_x = interior_and_tolerance(want_x, left, crop_w, size_w)
    keep_y, tol_y = interior_and_tolerance(want_y, top, crop_h, size_h)
    torch.testing.assert_close(seen_x[:, keep_x].double(), want_x[keep_x].expand(size_h, -1), rtol=0, atol=tol_x)
    torch.testing.assert_close(seen_y[keep_y].double(), want_y[keep_y, None].expand(-1, size_w), rtol=0, atol=tol_y)


def test_disk_target_radius_area_and_centre():
    settings = DataSettings(size=64, target=TargetKind.DISK, disk_radius_px=6.0)
    points = torch.tensor([[30.3, 25.7], [2.0, 2.0]])
    maps = heatmap_targets(points, torch.tensor([True, False]), 64, 64, settings).double()
    disk = maps[0]
    assert math.isclose(disk.sum().item(), math.pi * 36.0, rel_tol=0.01)
    rows, cols = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64), indexing="ij")
    dist = torch.hypot(cols - 30.3, rows - 25.7)
    assert torch.all(disk[dist <= 5.5] == 1.0) and torch.all(disk[dist >= 6.5] == 0.0)
    centroid = torch.stack([(disk * cols).sum(), (disk * rows).sum()]) / disk.sum()
    assert torch.hypot(*(centroid - torch.tensor([30.3, 25.7], dtype=torch.float64))) < 0.1
    assert maps[1].abs().sum() == 0.0


def test_gaussian_target_peaks_at_landmark():
    settings = DataSettings(size=32, target=TargetKind.GAUSSIAN, gaussian_sigma_px=2.0)
    maps = heatmap_targets(torch.tensor([[10.0, 20.0]]), torch.tensor([True]), 32, 32, settings)
    assert maps[0, 20, 10] == 1.0 and maps[0].argmax().item() == 20 * 32 + 10
    torch.testing.assert_close(maps[0, 20, 12], torch.tensor(math.exp(-0.5), dtype=torch.float32))


def _dense_targets(landmarks_px, visible, height, width, settings):
    """The targets as pelmark built them before the windowed version: the formula on every pixel of one image."""
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    points = landmarks_px.to(torch.float64)
    dx = cols[None] - points[:, 0, None, None]
    dy = rows[None] - points[:, 1, None, None]
    dist2 = dx.square() + dy.square()
    if settings.target is TargetKind.DISK:
        maps = (settings.disk_radius_px + 0.5 - dist2.sqrt()).clamp(0.0, 1.0)
    else:
        maps = torch.exp(-dist2 / (2.0 * settings.gaussian_sigma_px**2))
    return (maps * visible.to(maps.dtype)[:, None, None]).to(torch.float32)


@pytest.mark.parametrize(
    "kind, size, radius, sigma",
    [(TargetKind.DISK, 64, 6.0, 3.0), (TargetKind.DISK, 40, 2.3, 3.0), (TargetKind.GAUSSIAN, 96, 6.0, 3.0),
     (TargetKind.GAUSSIAN, 48, 6.0, 2.1), (TargetKind.GAUSSIAN, 24, 6.0, 5.0)],
)  # fmt: skip
def test_windowed_batched_targets_equal_the_whole_image_formula_bit_for_bit(kind, size, radius, sigma):
    settings = DataSettings(size=size, target=kind, disk_radius_px=radius, gaussian_sigma_px=sigma)
    generator = torch.Generator().manual_seed(size)
    # Inside, on the border, just outside and far outside the image; a window wider than the image (sigma 5 at 24²).
    points = torch.rand(3, 9, 2, dtype=torch.float64, generator=generator) * (size + 40) - 20
    points[0, :4] = torch.tensor([[0.0, 0.0], [size - 1.0, size - 1.0], [-0.49, size - 0.51], [3.5, 1e6]])
    visible = torch.rand(3, 9, generator=generator) > 0.2
    batched = heatmap_targets(points, visible, size, size, settings)
    assert batched.shape == (3, 9, size, size) and batched.dtype == torch.float32
    for b in range(3):
        one = heatmap_targets(points[b], visible[b], size, size, settings)
        reference = _dense_targets(points[b], visible[b], size, size, settings)
        assert torch.equal(one, reference) and torch.equal(batched[b], reference)


def test_sample_targets_centred_on_landmarks(store):
    ds = StoreDataset(store, DataSettings(size=48, disk_radius_px=3.0))
    sample = ds[0]
    rows, cols = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    for k in range(len(sample["visible"])):
        target = sample["heatmap_target"][k]
        x, y = sample["landmarks_px"][k].tolist()
        if not sample["visible"][k]:
            assert target.sum() == 0.0
        elif 4 < x < 43 and 4 < y < 43:
            centroid = torch.stack([(target * cols).sum(), (target * rows).sum()]) / target.sum()
            assert torch.hypot(centroid[0] - x, centroid[1] - y) < 0.1


def test_invisible_landmark_has_empty_target(store, tmp_path):
    copy = _copy(store, tmp_path)
    group = open_store(copy, mode="r+")
    ds = StoreDataset(copy, DataSettings(size=24))
    row = int(ds.rows[0])
    visible = np.ones(group["visible"].shape[1:], dtype=bool)
    visible[1] = False
    group["visible"][row] = visible
    points = np.asarray(group["landmarks_2d"][row])
    points[2] = (-30.0, 10.0)  # off the detector although the store says visible
    group["landmarks_2d"][row] = points
    sample = ds[0]
    assert not sample["visible"][1] and not sample["visible"][2] and sample["visible"][0]
    assert sample["heatmap_target"][1].sum() == 0.0 and sample["heatmap_target"][2].sum() == 0.0


def test_augmentation_is_determined_by_seed_epoch_and_row(store):
    settings = DataSettings(size=32, **AUG)
    a, b = StoreDataset(store, settings), StoreDataset(store, settings)
    for key in ("image", "landmarks_px", "intrinsics", "heatmap_target"):
        torch.testing.assert_close(a[1][key], b[1][key], rtol=0, atol=0)
    assert not torch.equal(a[0]["intrinsics"], a[1]["intrinsics"])  # rows differ
    first = a[1]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], first)
    a.set_epoch(0)
    assert torch.equal(a[1]["image"], first)
    other_seed = StoreDataset(store, dataclasses.replace(settings, seed=7))
    assert not torch.equal(other_seed[1]["image"], first)
    # The draw depends on the store row, not on the position in the dataset.
    sub = StoreDataset(store, settings, indices=a.rows[1:2])
    assert torch.equal(sub[0]["image"], first)


def test_dataloader_workers_do_not_change_batches(store):
    ds = StoreDataset(store, DataSettings(size=32, **AUG))
    ds.set_epoch(3)

    def batches(workers):
        loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel)
    for one, two in zip(serial, parallel):
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)


class _Spy:
    """Wraps a Zarr group, recording which arrays (and which rows of `images`) are read."""

    def __init__(self, group, log):
        self._group, self._log = group, log
        self.attrs = group.attrs

    def __getitem__(self, name):
        self._log.append(name)
        return _ArraySpy(self._group[name], self._log) if name == "images" else self._group[name]


class _ArraySpy:
    def __init__(self, array, log):
        self._array, self._log = array, log

    def __getitem__(self, key):
        self._log.append(("images", key))
        return self._array[key]


def test_construction_never_reads_images(store, monkeypatch):
    log: list = []
    monkeypatch.setattr(data_mod, "open_store", lambda path: _Spy(open_store(path), log))
    ds = StoreDataset(store, DataSettings(size=24))
    assert len(ds) > 0
    assert "images" not in log
    row = int(ds.rows[2])
    ds[2]
    assert [entry for entry in log if isinstance(entry, tuple)] == [("images", row)]

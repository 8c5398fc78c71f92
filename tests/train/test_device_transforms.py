"""pelmark train --transforms device: the batch made on the device is the workers' batch, and a run trains and resumes.

Tolerance of the images: the crop-and-resize weights are PyTorch's own, bit for bit
(tested below), so the device path differs from the workers' only in the order of the
float32 sums of two matrix products (and area's one division per axis against one per
block). That is a few float32 ulps of the image's range: measured at most 3e-7 of the
largest pixel on 768² → 512² crops. Normalisation keeps it at that size on [0, 1], and
``basic``'s gamma (0.7-1.5), contrast and noise stretch it by a few at most, so 1e-5 on
the [0, 1] images holds with a margin of ten; a wrong weight, crop or draw moves pixels by
1e-2 or more. Everything else in a batch (landmarks, visibility, pose, camera, labels) is
computed by the same code on the same draws and must be equal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from cohort_fixtures import write_bead_store
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.train import loop as loop_mod
from pelmark.train.augment import Augment
from pelmark.train.checkpoint import checkpoint_path, load_checkpoint
from pelmark.train.config import RunStatus, Strategy, resolve_config
from pelmark.train.data import DataSettings, StoreDataset, resize_image
from pelmark.train.device_transforms import (
    Transforms,
    _nearest_exact_index,
    crop_resize,
    model_inputs,
    resampling_matrices,
    resolve_transforms,
)

TINY = dict(size=32, encoder="resnet18", encoder_depth=3, batch_size=2, workers=0, device="cpu", checkpoint_every=1, lr=1e-3)
# Crops from 60 % of the side: down- and up-sampling (48² store images, 32² and 48² model inputs).
CROPS = dict(crop_scale=(0.6, 1.0), max_shift_frac=0.2)
IMAGE_ATOL = 1e-5  # see the module docstring
EXACT = ("landmarks_px", "visible", "pose", "landmarks_3d", "intrinsics", "index", "segmentation")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """3 bead subjects x 4 views of 48², with bone labels."""
    return write_bead_store(tmp_path_factory.mktemp("cohort"), bones=True)


# ---------------------------------------------------------------- the pieces against PyTorch's own


@pytest.mark.parametrize("sizes", [(range(1, 130), (8, 24, 37, 64)), ((600, 614, 700, 767, 768, 1024, 1536), (256, 512))])
def test_resampling_weights_are_resize_images_bit_for_bit(sizes):
    """resize_image of an identity matrix along one axis is its weight matrix (each output is one weight times 1)."""
    lengths, outputs = sizes
    for n in lengths:
        for size in outputs:
            expected = resize_image(torch.eye(n), size, n)  # area when size divides n, else antialiased bilinear
            matrix = resampling_matrices(torch.tensor([3]), torch.tensor([n]), n + 5, size)[0]
            assert torch.equal(matrix[:, 3 : 3 + n], expected), (n, size)
            assert not matrix[:, :3].any() and not matrix[:, 3 + n :].any()


def test_nearest_exact_index_is_pytorchs():
    for n in [*range(1, 130), 600, 614, 767, 1536]:
        for size in (8, 24, 37, 64, 512):
            ramp = torch.arange(n, dtype=torch.float32)[None, None, :, None]
            expected = F.interpolate(ramp, size=(size, 1), mode="nearest-exact")[0, 0, :, 0].long()
            assert torch.equal(_nearest_exact_index(torch.tensor([n]), size)[0], expected), (n, size)


def test_a_batch_of_crops_is_resized_as_resize_image_resizes_each():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 96, 96, generator=generator) * 300.0
    # Area (96 → 32, 64 → 32), antialiased bilinear down (70 x 51) and up (20 x 25), in one batch.
    crops = torch.tensor([[0, 0, 96, 96], [10, 20, 64, 64], [5, 40, 70, 51], [60, 3, 20, 25]])
    out = crop_resize(images, crops, 32)
    for image, (top, left, height, width), got in zip(images, crops.tolist(), out):
        expected = resize_image(image[top : top + height, left : left + width], 32, 32)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


# ---------------------------------------------------------------- whole batches


def _batch(store: Path, settings: DataSettings, epoch: int) -> dict:
    dataset = StoreDataset(store, settings)
    dataset.set_epoch(epoch)
    return next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))


@pytest.mark.parametrize("augment", [Augment.NONE, Augment.BASIC])
@pytest.mark.parametrize("size", [32, 48])
def test_the_device_batch_is_the_workers_batch(store, augment, size):
    settings = DataSettings(size=size, augment=augment, segmentation=True, targets=False, **CROPS)
    workers = _batch(store, settings, epoch=2)
    raw = _batch(store, dataclasses.replace(settings, device_transforms=True), epoch=2)
    assert "image" not in raw and raw["store_image"].dtype == torch.float16  # the store's, uncropped
    device = model_inputs(raw, settings)
    assert device.keys() == workers.keys()
    assert device["image"].shape == workers["image"].shape == (len(workers["index"]), 1, size, size)
    torch.testing.assert_close(device["image"], workers["image"], rtol=0, atol=IMAGE_ATOL)
    for key in EXACT:
        assert torch.equal(device[key], workers[key]), key
    if augment is Augment.BASIC:  # the crops differ per image, and so does the noise: a real test
        assert len(set(map(tuple, raw["crop"].tolist()))) > 1 and raw["noise"].shape == (len(raw["index"]), size, size)


def test_the_device_batch_takes_the_workers_targets_when_asked(store):
    settings = DataSettings(size=32, augment=Augment.BASIC, device_transforms=True, **CROPS)
    raw = _batch(store, settings, epoch=0)
    workers = _batch(store, DataSettings(size=32, augment=Augment.BASIC, **CROPS), epoch=0)
    assert torch.equal(raw["heatmap_target"], workers["heatmap_target"])


# ---------------------------------------------------------------- settings


def test_auto_is_the_device_on_cuda_and_the_workers_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_transforms("auto", cpu, Augment.BASIC) is Transforms.WORKER
    assert resolve_transforms("auto", cuda, Augment.BASIC) is Transforms.DEVICE
    assert resolve_transforms("auto", cuda, Augment.REALISTIC) is Transforms.WORKER
    assert resolve_transforms("device", cpu, Augment.NONE) is Transforms.DEVICE
    assert resolve_transforms("worker", cuda, Augment.NONE) is Transforms.WORKER
    assert resolve_config(Strategy.BASELINE).transforms is Transforms.AUTO
    assert "transforms" in resolve_config(Strategy.BASELINE).RUNTIME_FIELDS  # a resume may switch it


def test_realistic_on_the_device_and_unknown_values_are_one_line_errors(store, tmp_path):
    with pytest.raises(PelmarkError, match="transforms device cannot run augment realistic"):
        resolve_config(Strategy.BASELINE, {"transforms": "device", "augment": "realistic"})
    with pytest.raises(PelmarkError, match="realistic augmentation runs in the DataLoader workers"):
        DataSettings(augment=Augment.REALISTIC, device_transforms=True)
    with pytest.raises(PelmarkError, match="transforms"):
        resolve_config(Strategy.BASELINE, {"transforms": "gpu"})
    base = ["train", "baseline", str(store), "--no-progress", "--device", "cpu"]
    for extra in (["--transforms", "device", "--augment", "realistic"], ["--transforms", "gpu"]):
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run"), *extra])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "transforms" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a run


def _config(**changes):
    return resolve_config(Strategy.BASELINE, {}, {**TINY, "epochs": 2, "augment": "basic", **changes})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(run_dir, "last"))["model"]


def test_a_device_transforms_run_completes_resumes_and_trains_as_the_workers_do(store, tmp_path):
    config = _config(transforms="device")
    whole = loop_mod.train(config, store, tmp_path / "whole", progress=False)
    assert whole.status is RunStatus.COMPLETE
    info = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert info["config"]["transforms"] == "device" and info["data"]["device_transforms"] is True

    def crash(step: int) -> None:
        if step == whole.steps - 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        loop_mod.train(config, store, tmp_path / "crashed", progress=False, after_step=crash)
    resumed = loop_mod.train(config, store, tmp_path / "crashed", resume=True, progress=False)
    assert resumed.status is RunStatus.COMPLETE and resumed.steps == whole.steps
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The worker path's first step sees the same images (to 1e-5) and targets: the same loss, to rounding.
    workers = loop_mod.train(_config(transforms="worker", max_steps=1), store, tmp_path / "workers", progress=False)
    assert workers.status is RunStatus.COMPLETE
    first = [(tmp_path / run / "metrics_steps.csv").read_text().splitlines()[1].split(",")[2] for run in ("whole", "workers")]
    assert float(first[0]) == pytest.approx(float(first[1]), rel=1e-4)


@pytest.mark.gpu
def test_on_cuda_the_device_batch_is_the_workers_cpu_batch(store):
    """Not yet run: no GPU was lent when this was written. cuBLAS float32 (TF32 off) and CUDA's pow."""
    settings = DataSettings(size=32, augment=Augment.BASIC, segmentation=True, targets=False, **CROPS)
    workers = _batch(store, settings, epoch=1)
    raw = _batch(store, dataclasses.replace(settings, device_transforms=True), epoch=1)
    device = model_inputs({k: v.cuda() if torch.is_tensor(v) else v for k, v in raw.items()}, settings)
    torch.testing.assert_close(device["image"].cpu(), workers["image"], rtol=0, atol=IMAGE_ATOL)
    assert torch.equal(device["segmentation"].cpu(), workers["segmentation"])

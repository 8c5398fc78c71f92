"""pelmark.train.augment: the realistic preset is deterministic, moves no landmark it should not, and turns
the geometry with the image; augment = "realistic" reaches the data through [train] and --augment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cohort_fixtures import write_bead_store
from pelmark import geometry
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.registration import register
from pelmark.train.augment import (
    Augment,
    RealisticRanges,
    realistic_image,
    sample_realistic,
    turned_camera_180,
    turned_pose_180,
)
from pelmark.train.config import TrainConfig, resolve_config
from pelmark.train.data import DataSettings, StoreDataset, camera_from_intrinsics

NO_TURN = RealisticRanges(rot180_probability=0.0)
ALWAYS_TURN = RealisticRanges(rot180_probability=1.0)
GEOMETRY = ("landmarks_px", "visible", "intrinsics", "pose", "landmarks_3d")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """3 bead subjects x 4 views of 48 x 48."""
    return write_bead_store(tmp_path_factory.mktemp("cohort"))


def _dataset(store: Path, **changes) -> StoreDataset:
    return StoreDataset(store, DataSettings(size=32, augment=Augment.REALISTIC, **changes))


def _params(seed: int = 0, ranges: RealisticRanges = RealisticRanges()):
    return sample_realistic(np.random.default_rng(seed), ranges, (0.7, 1.5), (0.8, 1.2))


def _ramp(size: int = 32) -> torch.Tensor:
    """A line-integral image: a smooth body with a bright 'bone' square."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    body = 200.0 * torch.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * (size / 3) ** 2))
    body[10:16, 12:20] += 40.0
    return body


# ---------------------------------------------------------------- the chain


def test_the_chain_is_a_function_of_its_draw():
    image, params = _ramp(), _params()
    first = realistic_image(image, params, pixel_area_mm2=0.35)
    assert first.shape == image.shape and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, realistic_image(image, params, pixel_area_mm2=0.35))
    assert not torch.equal(first, realistic_image(image, _params(1), pixel_area_mm2=0.35))
    assert torch.equal(image, _ramp())  # the caller's tensor is left alone


def test_each_draw_is_independent_of_the_other_ranges():
    """Every value is drawn every time: turning the 180° turn on changes nothing else."""
    plain, turned = _params(3, NO_TURN), _params(3, ALWAYS_TURN)
    assert not plain.rot180 and turned.rot180
    assert dataclasses.replace(turned, rot180=False) == plain


def test_lower_dose_is_noisier():
    """Poisson noise at the dose drawn: behind a step of 3 nepers, the spread falls as 1/sqrt(quanta)."""
    step = torch.zeros(64, 64)
    step[:, 32:] = 100.0
    quiet = dataclasses.replace(
        _params(), collimator_frac=(0.0, 0.0, 0.0, 0.0), scatter_to_primary=0.0, blur_sigma_px=0.0,
        readout_noise_quanta=0.0, gamma=1.0, contrast=1.0, invert=False, bone_multiplier=1.0, peak_attenuation=3.0,
    )

    def spread(dose: float) -> float:
        image = realistic_image(step, dataclasses.replace(quiet, dose_quanta_per_mm2=dose), pixel_area_mm2=1.0)
        return float(image[:, 33:].double().std())

    # 1e5 quanta: 5000 behind the step, a spread of about 1/sqrt(5000)/3 of the range; 100 x fewer quanta, 10 x more.
    assert 6.0 < spread(1e3) / spread(1e5) < 15.0


def test_collimator_bands_are_bright_after_the_log():
    params = dataclasses.replace(
        _params(), collimator_frac=(0.25, 0.0, 0.0, 0.0), collimator_transmission=0.01, invert=False,
        gamma=1.0, contrast=1.0, dose_quanta_per_mm2=1e6,
    )
    image = realistic_image(torch.full((32, 32), 50.0), params, pixel_area_mm2=1.0)
    assert image[:8].mean() > image[8:].mean() + 0.5


# ---------------------------------------------------------------- through the dataset


def test_realistic_samples_are_determined_by_seed_epoch_and_row(store):
    a, b = _dataset(store), _dataset(store)
    for key in ("image", "heatmap_target", *GEOMETRY):
        torch.testing.assert_close(a[1][key], b[1][key], rtol=0, atol=0)
    first = a[1]["image"]
    assert not torch.equal(_dataset(store, seed=7)[1]["image"], first)
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], first)
    a.set_epoch(0)
    assert torch.equal(a[1]["image"], first)
    sub = StoreDataset(store, a.settings, indices=a.rows[1:2])
    assert torch.equal(sub[0]["image"], first)


def test_intensity_transforms_leave_the_geometry_bit_identical(store):
    """Without the turn, realistic moves nothing: the same crop as basic, the same landmarks, visibility, camera and pose."""
    realistic = _dataset(store, realistic=NO_TURN)
    basic = StoreDataset(store, DataSettings(size=32, augment=Augment.BASIC))
    for i in range(len(realistic)):
        mine, theirs = realistic[i], basic[i]
        for key in (*GEOMETRY, "heatmap_target"):
            assert torch.equal(mine[key], theirs[key]), key
        assert not torch.equal(mine["image"], theirs["image"])


def test_the_turn_moves_image_landmarks_camera_and_pose_together(store):
    plain, turned = _dataset(store, realistic=NO_TURN), _dataset(store, realistic=ALWAYS_TURN)
    for i in range(len(plain)):
        a, b = plain[i], turned[i]
        assert torch.equal(b["image"], a["image"].flip(-2, -1))
        torch.testing.assert_close(b["landmarks_px"], 31.0 - a["landmarks_px"], rtol=0, atol=1e-5)  # centres at 0..31
        assert torch.equal(b["visible"], a["visible"])
        camera = camera_from_intrinsics(b["intrinsics"])
        projected = geometry.project(b["landmarks_3d"].double()[None], b["pose"][None], camera)[0]
        torch.testing.assert_close(projected, b["landmarks_px"].double(), rtol=0, atol=1e-4)
        # The targets' centroids follow the turned landmarks.
        maps = b["heatmap_target"].double()
        grid = torch.arange(32, dtype=torch.float64)
        mass = maps.sum((-2, -1))
        centroid = torch.stack([(maps.sum(-2) * grid).sum(-1), (maps.sum(-1) * grid).sum(-1)], -1) / mass[:, None]
        inside = b["visible"] & (b["landmarks_px"] > 6).all(-1) & (b["landmarks_px"] < 25).all(-1)
        assert inside.any()
        torch.testing.assert_close(centroid[inside], b["landmarks_px"][inside].double(), rtol=0, atol=0.05)


def test_a_turned_sample_registers_to_its_turned_pose(store):
    """PEL registers the turned points in one reference camera; LM must find the turned pose there."""
    sample = _dataset(store, realistic=ALWAYS_TURN)[0]
    camera = camera_from_intrinsics(sample["intrinsics"])
    result = register(sample["landmarks_px"].double()[None], sample["visible"].double()[None], sample["landmarks_3d"].double()[None], camera)
    assert float(geometry.rotation_angle_deg(result.pose, sample["pose"][None]).max()) < 0.1


def test_turned_pose_and_camera_by_hand():
    """A point on the optical axis stays put; one 10 px right of the principal point lands 10 px left of it."""
    camera = geometry.Camera(height=32, width=32, sdd_mm=1000.0, sid_mm=800.0, spacing_x_mm=1.0, spacing_y_mm=1.0, cx_px=15.5, cy_px=15.5)
    pose = torch.tensor([[0.1, -0.2, 0.05, 3.0, -4.0, 5.0]], dtype=torch.float64)
    points = torch.randn(1, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 40
    before = geometry.project(points, pose, camera)
    after = geometry.project(points, turned_pose_180(pose, camera), turned_camera_180(camera))
    torch.testing.assert_close(after, 31.0 - before, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- settings


def test_the_preset_is_a_train_key_and_old_booleans_still_mean_what_they_meant():
    assert resolve_config("baseline", {"augment": "realistic"}, {}).augment is Augment.REALISTIC
    assert resolve_config("baseline", {}, {"augment": "realistic"}).augment is Augment.REALISTIC
    assert resolve_config("baseline", {"augment": True}, {}).augment is Augment.BASIC
    assert resolve_config("baseline", {"augment": False}, {}).augment is Augment.NONE
    assert resolve_config("baseline", {}, {}).augment is Augment.NONE
    # A run.json written when augment was a boolean resumes under the same setting spelt by name.
    basic = resolve_config("baseline", {"augment": "basic"}, {})
    old = TrainConfig.from_dict({**basic.to_dict(), "augment": True})
    assert old.differences(basic) == [] and basic.to_dict()["augment"] == "basic"
    assert DataSettings(augment=True).augment is Augment.BASIC


def test_an_unknown_preset_is_refused_in_one_line_naming_the_key(tmp_path):
    manifest = tmp_path / "m.toml"
    with pytest.raises(PelmarkError) as info:
        resolve_config("baseline", {"augment": "photoreal"}, {}, manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}: [train] augment must be one of none, basic, realistic") and "\n" not in message
    assert message.endswith('got "photoreal"')
    with pytest.raises(PelmarkError, match=r'^--augment must be one of none, basic, realistic.*got "true"$'):
        resolve_config("baseline", {}, {"augment": "true"})


def test_the_cli_option_trains_with_the_preset(store, tmp_path):
    run = tmp_path / "run"
    options = ["--size", "32", "--encoder", "resnet18", "--encoder-depth", "3", "--batch-size", "2", "--workers", "0",
               "--max-steps", "1", "--no-progress", "--device", "cpu", "--augment", "realistic"]
    result = CliRunner().invoke(app, ["train", "baseline", str(store), "--out", str(run), *options])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["config"]["augment"] == "realistic"
    bad = CliRunner().invoke(app, ["train", "baseline", str(store), "--out", str(tmp_path / "bad"), *options[:-1], "vivid"])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1 and "--augment" in bad.output

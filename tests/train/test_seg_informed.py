"""The seg-informed strategy (seed 003): each loss on hand-computed cases, the visibility rule, the network, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cohort_fixtures import BONE_CLASSES, write_bead_store
from pelmark.errors import PelmarkError
from pelmark.landmark_sets import PAPER_LANDMARKS, SEED003_CLASSES, landmark_bone_matrix
from pelmark.train.checkpoint import load_run
from pelmark.train.config import RunStatus, Strategy, resolve_config
from pelmark.train.data import DataSettings, StoreDataset
from pelmark.train.loop import train
from pelmark.train.model import ModelSpec, build_model
from pelmark.train.seg_informed import (
    dice_ce_loss,
    discrete_visibility,
    kl_heatmap_loss,
    soft_visibility,
    split_outputs,
    visibility_loss,
)

TINY = dict(size=32, encoder="resnet18", encoder_depth=3, batch_size=2, workers=0, device="cpu", checkpoint_every=1, lr=1e-3)


def test_dice_and_cross_entropy_by_hand():
    # Two pixels, two classes. Logits (0, 0) give p = (1/2, 1/2) at both pixels; labels (0, 1).
    logits = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    dice, ce = dice_ce_loss(logits, labels, smooth=0.0)
    # Class 0: intersection 1/2, sum p = 1, sum y = 1 -> d = 2 (1/2) / 2 = 1/2; class 1 the same. Loss 1 - 1/2.
    torch.testing.assert_close(dice, torch.tensor(0.5))
    torch.testing.assert_close(ce, torch.tensor(math.log(2.0)))
    # Confident and right: Dice loss and cross-entropy near 0.
    sure = torch.tensor([[[[20.0, -20.0]], [[-20.0, 20.0]]]])
    dice, ce = dice_ce_loss(sure, labels, smooth=0.0)
    assert float(dice) < 1e-6 and float(ce) < 1e-6
    # The smoothing term: a class absent from target and prediction scores d = 1 (no loss from it).
    three = torch.cat([sure, torch.full((1, 1, 1, 2), -40.0)], dim=1)
    assert float(dice_ce_loss(three, labels, smooth=1.0)[0]) < 1e-6


def test_kl_by_hand_and_invisible_landmarks_weigh_nothing():
    # A 1 x 2 heatmap with logits (0, log 3): p = (1/4, 3/4). Target (1, 1) -> q = (1/2, 1/2).
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[5.0, -5.0]]]])  # (B=1, L=2, 1, 2)
    targets = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])
    visible = torch.tensor([[True, False]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(kl_heatmap_loss(logits, targets, visible), torch.tensor(expected, dtype=torch.float32))
    # A heatmap equal to its target has KL 0; no visible landmark gives 0 with a gradient of zeros.
    torch.testing.assert_close(kl_heatmap_loss(torch.log(targets[:, :1] / 2.0), targets[:, :1], visible[:, :1]), torch.tensor(0.0))
    x = logits.clone().requires_grad_(True)
    loss = kl_heatmap_loss(x, targets, torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0


def test_visibility_loss_by_hand():
    # v̂ = (1, 0.5, 0, 0.5) against v = (1, 1, 0, 0): errors 0, 0.5, 0, 0.5; the last weighs 2 (a false positive).
    predicted = torch.tensor([[1.0, 0.5, 0.0, 0.5]])
    visible = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(visibility_loss(predicted, visible), torch.tensor((0.0 + 0.5 + 0.0 + 2 * 0.5) / 4))


def _two_landmarks():
    """A 1 x 3 image, 2 landmarks, classes background / bone 1 / bone 2; landmark 0 lies on bone 1, landmark 1 on bone 2."""
    bones = torch.tensor([[False, True, False], [False, False, True]])
    seg = torch.full((1, 3, 1, 3), -30.0)
    seg[0, 0, 0, 0] = seg[0, 1, 0, 1] = seg[0, 2, 0, 2] = 30.0  # pixel 0 background, 1 bone 1, 2 bone 2
    return bones, seg


def test_discrete_and_smooth_visibility_follow_the_papers_rule():
    bones, seg = _two_landmarks()
    heat = torch.full((1, 2, 1, 3), -30.0)
    heat[0, 0, 0, 1] = 30.0  # landmark 0 found on its bone: 1
    heat[0, 1, 0, 0] = 30.0  # landmark 1 found on background: 0.5
    assert discrete_visibility(heat, seg, bones).tolist() == [[1.0, 0.5]]
    torch.testing.assert_close(soft_visibility(heat, seg, bones), torch.tensor([[1.0, 0.5]]), atol=1e-6, rtol=0)
    heat[0, 1] = -30.0  # landmark 1 nowhere: 0
    assert discrete_visibility(heat, seg, bones).tolist() == [[1.0, 0.0]]
    torch.testing.assert_close(soft_visibility(heat, seg, bones), torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)
    # In between: a peak logit 0 (p = 1/2) spread evenly over the three pixels (q = 1/3) gives 1/2 (1 + 1/3) / 2.
    flat = torch.zeros(1, 2, 1, 3)
    torch.testing.assert_close(soft_visibility(flat, seg, bones)[0, 0], torch.tensor(1.0 / 3.0), atol=1e-6, rtol=0)


def test_the_landmark_to_bone_map_of_the_paper_landmarks():
    matrix = landmark_bone_matrix(PAPER_LANDMARKS, SEED003_CLASSES)
    by_name = {name: [SEED003_CLASSES[k - 1] for k, on in enumerate(row) if on] for name, row in zip(PAPER_LANDMARKS, matrix)}
    assert by_name["ASIS-l"] == ["hemipelvis-l"] and by_name["MOF-r"] == ["hemipelvis-r"]
    assert by_name["SPS"] == ["hemipelvis-l", "hemipelvis-r"]
    assert all(not row[0] for row in matrix)  # background is never a landmark's bone
    # A landmark without a known bone (the bead cohort's A..E) may lie on any labelled bone.
    assert landmark_bone_matrix(("A",), BONE_CLASSES) == [[False, True, True]]


def test_the_network_has_one_encoder_two_decoders_and_splits_its_output():
    spec = ModelSpec(classes=3, encoder="resnet18", encoder_depth=3, segmentation_classes=("a", "b"))
    model = build_model(spec).eval()
    out = model(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 3 + 3, 32, 32) and spec.output_channels == 6
    heat, seg = split_outputs(out, 3)
    assert heat.shape == (2, 3, 32, 32) and seg.shape == (2, 3, 32, 32)
    assert split_outputs(heat, 3)[1] is None
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory) -> Path:
    return write_bead_store(tmp_path_factory.mktemp("cohort"), bones=True)


def test_samples_carry_labels_cropped_and_resized_with_the_image(labelled_store):
    plain = StoreDataset(labelled_store, DataSettings(size=24, segmentation=True))
    sample = plain[0]
    assert sample["segmentation"].shape == (24, 24) and sample["segmentation"].dtype == torch.int64
    assert set(sample["segmentation"].unique().tolist()) <= {0, 1, 2}
    # At the store's own size nothing is resampled: the labels are the store's.
    same = StoreDataset(labelled_store, DataSettings(size=48, segmentation=True))[0]
    from pelmark.store import open_store

    np.testing.assert_array_equal(same["segmentation"].numpy(), open_store(labelled_store)["segmentation"][int(same["index"])])
    augmented = StoreDataset(labelled_store, DataSettings(size=48, segmentation=True, augment=True))
    crop, _ = augmented.sample_params(int(augmented.rows[0]))
    labels = open_store(labelled_store)["segmentation"][int(augmented.rows[0])][crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
    resized = augmented[0]["segmentation"]
    assert resized.shape == (48, 48) and set(resized.unique().tolist()) == set(np.unique(labels).tolist())


def test_seg_informed_trains_and_loads(labelled_store, tmp_path):
    config = resolve_config(Strategy.SEG_INFORMED, {}, {**TINY, "epochs": 1})
    assert config.pel == 0 and config.bce == 0 and config.target.value == "gaussian"
    report = train(config, labelled_store, tmp_path / "run", progress=False)
    assert report.status is RunStatus.COMPLETE
    run = load_run(tmp_path / "run", "best")
    assert run.info["model_spec"]["segmentation_classes"] == list(BONE_CLASSES)
    out = run.model(torch.zeros(1, 1, 32, 32))
    assert out.shape[1] == 5 + 3
    rows = (tmp_path / "run" / "metrics_steps.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = dict(zip(header, rows[1].split(",")))
    assert all(math.isfinite(float(values[k])) for k in ("dice_loss", "ce_loss", "kl_loss", "vis_loss"))


def test_seg_informed_refuses_a_store_without_labels(tmp_path):
    store = write_bead_store(tmp_path / "plain")
    with pytest.raises(PelmarkError, match="bone labels"):
        train(resolve_config(Strategy.SEG_INFORMED, {}, TINY), store, tmp_path / "run", progress=False)


def test_the_visibility_loss_ramps_in_over_its_warm_up():
    from pelmark.train.config import Strategy, resolve_config
    from pelmark.train.loop import visibility_weight

    config = resolve_config(Strategy.SEG_INFORMED, {}, {"visibility_weight": 10.0, "visibility_warmup_steps": 4})
    assert [visibility_weight(config, step) for step in range(6)] == [2.5, 5.0, 7.5, 10.0, 10.0, 10.0]
    plain = resolve_config(Strategy.SEG_INFORMED, {}, {"visibility_weight": 10.0})
    assert plain.visibility_warmup_steps == 0 and visibility_weight(plain, 0) == 10.0  # seed 003: full weight at once
    with pytest.raises(PelmarkError, match="visibility-warmup-steps must be an integer >= 0"):
        resolve_config(Strategy.SEG_INFORMED, {}, {"visibility_warmup_steps": -1})


def test_the_demo_preset_ramps_seed_003s_visibility_weight_in_and_leaves_the_other_strategies_alone():
    from pelmark.train.config import Strategy, resolve_config
    from pelmark.train.presets import TRAIN_PRESETS

    demo = TRAIN_PRESETS["demo"]
    seg = resolve_config(Strategy.SEG_INFORMED, demo)
    assert (seg.kl_weight, seg.visibility_weight, seg.visibility_warmup_steps) == (1.0, 10.0, 288)
    # The ramp covers the first half of the run: 16 epochs of the demo store's 36 batches.
    assert seg.epochs == 16 and seg.visibility_warmup_steps == seg.epochs * 36 // 2
    for strategy in (Strategy.BASELINE, Strategy.FINETUNE):
        other = resolve_config(strategy, demo, {"init": "x"} if strategy is Strategy.FINETUNE else None)
        assert (other.kl_weight, other.visibility_warmup_steps) == (0.1, 0)

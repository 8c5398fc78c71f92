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
    PAD_VALUE,
    canvas_margin,
    dice_ce_loss,
    argmax_on_bone,
    discrete_visibility,
    gaussian_targets,
    image_argmax,
    kl_heatmap_loss,
    seg_informed_loss,
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


def test_an_argmax_in_the_margin_reads_the_nearest_image_pixel_for_its_bone():
    bones, seg = _two_landmarks()  # a 1 x 3 image
    heat = torch.full((1, 2, 3, 5), -30.0)  # a 1 px canvas margin
    heat[0, 0, 1, 0] = 30.0  # landmark 0 peaks 1 px left of the image, beside pixel 0
    heat[0, 1, 1, 4] = 30.0  # landmark 1 peaks 1 px right of it, beside pixel 2
    # Pixel 0 is background (not landmark 0's bone 1), pixel 2 is bone 2 (landmark 1's).
    assert argmax_on_bone(image_argmax(heat, 1), seg, bones).tolist() == [[False, True]]
    assert discrete_visibility(heat, seg, bones).tolist() == [[0.0, 0.0]]  # outside the image: not present


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


def test_the_canvas_margin_is_read_off_the_output_size():
    assert canvas_margin(torch.zeros(1, 2, 40, 40), (32, 32)) == 4
    assert canvas_margin(torch.zeros(1, 2, 32, 32), torch.Size([1, 1, 32, 32])) == 0
    for size in [(40, 42), (33, 33), (30, 30)]:  # uneven sides, an odd extra, smaller than the image
        with pytest.raises(ValueError, match="not a canvas"):
            canvas_margin(torch.zeros(1, 2, *size), (32, 32))


def test_a_canvas_model_pads_its_input_and_predicts_on_the_canvas():
    spec = ModelSpec(classes=3, encoder="resnet18", encoder_depth=3, segmentation_classes=("a", "b"), canvas_margin=4)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    model = build_model(spec).eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    image = torch.rand(2, 1, 32, 32)
    out = model(image)
    assert out.shape == (2, 3 + 3, 40, 40)
    padded = seen[0]
    assert padded.shape == (2, 1, 40, 40)
    torch.testing.assert_close(padded[..., 4:-4, 4:-4], image, atol=0, rtol=0)
    ring = torch.ones(40, 40, dtype=torch.bool)
    ring[4:-4, 4:-4] = False
    assert bool((padded[..., ring] == PAD_VALUE).all())
    heat, seg = split_outputs(out, 3, canvas_margin(out, image.shape))
    assert heat.shape == (2, 3, 40, 40) and seg.shape == (2, 3, 32, 32)
    torch.testing.assert_close(seg, out[:, 3:, 4:-4, 4:-4], atol=0, rtol=0)
    with pytest.raises(PelmarkError, match="canvas margin"):
        ModelSpec(classes=3, canvas_margin=4)  # a heatmap-only model has no canvas


def test_visibility_on_a_canvas_by_hand():
    # The 1 x 3 image of _two_landmarks on a canvas of margin 1 (3 x 5): image pixel (row 0, col c) is canvas (1, c + 1).
    bones, seg = _two_landmarks()
    heat = torch.full((1, 2, 3, 5), -30.0)
    heat[0, 0, 1, 2] = 30.0  # landmark 0 at image column 1, on its bone: 1
    heat[0, 1, 1, 0] = 30.0  # landmark 1 peaks in the margin, left of the image: absent, however high its peak
    assert image_argmax(heat, 1).tolist() == [[[1.0, 0.0], [-1.0, 0.0]]]
    assert discrete_visibility(heat, seg, bones).tolist() == [[1.0, 0.0]]
    torch.testing.assert_close(soft_visibility(heat, seg, bones), torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)
    # Half its softmax mass in the margin, half on its bone (image column 2): s = 1/2, q = 1/2, p = 1 -> (1/2 + 1/2) / 2.
    heat[0, 1, 1, 3] = 30.0
    torch.testing.assert_close(soft_visibility(heat, seg, bones)[0, 1], torch.tensor(0.5), atol=1e-6, rtol=0)
    # Its argmax is the first of the two maxima (the margin pixel): still absent.
    assert discrete_visibility(heat, seg, bones)[0, 1] == 0.0
    # Peaking in the margin below the image (canvas row 2) is outside too.
    heat[0, 1] = -30.0
    heat[0, 1, 2, 3] = 30.0
    assert discrete_visibility(heat, seg, bones)[0, 1] == 0.0


def test_the_loss_on_a_canvas_targets_landmarks_outside_the_image_and_segments_the_image_only():
    bones = torch.tensor([[False, True], [False, True], [False, True]])
    margin, size, sigma = 4, 8, 1.5
    canvas = size + 2 * margin
    # Landmark 0 inside the image, 1 three pixels left of it (on the canvas), 2 beyond the canvas.
    points = torch.tensor([[[3.0, 5.0], [-3.0, 2.0], [-20.0, 2.0]]])
    visible = torch.tensor([[True, False, False]])
    targets = gaussian_targets(points + margin, torch.ones(1, 3, dtype=torch.bool), canvas, canvas, sigma)
    heat = torch.log(targets + 1e-30)
    heat[0, 2] = 0.0
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1
    seg = torch.full((1, 2, canvas, canvas), 50.0)  # garbage in the margin, where no label is
    seg[0, :, margin:-margin, margin:-margin] = torch.stack([labels[0] == 0, labels[0] == 1]).float() * 40.0 - 20.0
    outputs = torch.cat([heat, seg], dim=1)
    terms = seg_informed_loss(outputs, labels, points, visible, bones, sigma)
    # Landmarks 0 and 1 have their targets: KL 0; landmark 2 (off the canvas) weighs nothing.
    assert abs(terms.log["kl_loss"]) < 1e-4
    # Shift landmark 1's heatmap by a pixel: its KL is the only one left.
    moved = outputs.clone()
    moved[0, 1] = torch.roll(heat[0, 1], 1, dims=-1)
    expected = kl_heatmap_loss(moved[:, 1:2], targets[:, 1:2], torch.ones(1, 1, dtype=torch.bool)) / 2
    torch.testing.assert_close(torch.tensor(seg_informed_loss(moved, labels, points, visible, bones, sigma).log["kl_loss"]), expected)
    # The segmentation's losses see the image only: those of the cropped logits.
    dice, ce = dice_ce_loss(seg[..., margin:-margin, margin:-margin], labels)
    assert terms.log["dice_loss"] == pytest.approx(float(dice)) and terms.log["ce_loss"] == pytest.approx(float(ce))
    # The visibility loss's weight of an absent landmark: seed 003's 2 by default, or as configured.
    seg_logits = seg[..., margin:-margin, margin:-margin]
    v_hat = soft_visibility(heat, seg_logits, bones)
    for weight, got in ((2.0, terms), (1.0, seg_informed_loss(outputs, labels, points, visible, bones, sigma, absent_weight=1.0))):
        assert got.log["vis_loss"] == pytest.approx(float(visibility_loss(v_hat, visible, weight)), abs=1e-6)
    assert terms.log["dice_loss"] < 1e-3
    # The visibility loss's truth is presence in the image. Every peak logit is 0 (p = 1/2): landmark 0's softmax
    # lies on the edge of its bone (q about 1/2); landmark 1's lies in the margin but for its Gaussian's tail, so its
    # v̂ is small; landmark 2's flat heatmap puts (8 / 16)² of its mass on the image.
    vis = soft_visibility(heat, seg[..., margin:-margin, margin:-margin], bones)
    assert float(vis[0, 1]) < 0.05 < 0.3 < float(vis[0, 0]) <= 0.5
    assert float(vis[0, 2]) == pytest.approx(0.5 * (0.25 + 16 / 256) / 2, rel=1e-4)
    assert terms.log["vis_loss"] == pytest.approx(float(visibility_loss(vis, visible)), rel=1e-5)


def test_a_canvas_margin_is_for_seg_informed_and_must_fit_the_encoders_stride():
    with pytest.raises(PelmarkError, match="seg-informed strategy only"):
        resolve_config(Strategy.BASELINE, {}, {**TINY, "canvas_margin_px": 4})
    with pytest.raises(PelmarkError, match="multiple of 8"):
        resolve_config(Strategy.SEG_INFORMED, {}, {**TINY, "canvas_margin_px": 3})
    assert resolve_config(Strategy.SEG_INFORMED, {}, {**TINY, "canvas_margin_px": 4}).canvas_margin_px == 4


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


def test_a_canvas_run_trains_validates_and_evaluates_in_image_pixels(labelled_store, tmp_path):
    from pelmark.evaluate.predict import predict_split, read_truth
    from pelmark.store import Split

    config = resolve_config(Strategy.SEG_INFORMED, {}, {**TINY, "epochs": 1, "canvas_margin_px": 4})
    assert train(config, labelled_store, tmp_path / "run", progress=False).status is RunStatus.COMPLETE
    run = load_run(tmp_path / "run", "best")
    assert run.info["model_spec"]["canvas_margin"] == 4
    truth = read_truth(labelled_store, Split.NOVEL_SUBJECT, 32)
    evaluated = predict_split(run, labelled_store, truth, workers=0, progress=False)
    images = torch.stack([StoreDataset(labelled_store, DataSettings(size=32, splits=(Split.NOVEL_SUBJECT,), targets=False), indices=truth.rows)[i]["image"] for i in range(len(truth.rows))])
    with torch.no_grad():
        outputs = run.model(images).float()
    assert outputs.shape[-2:] == (40, 40)
    heat, seg = split_outputs(outputs, 5, 4)
    np.testing.assert_array_equal(evaluated.predicted_px, image_argmax(heat, 4).numpy())
    bones = torch.tensor(landmark_bone_matrix(run.landmark_names, BONE_CLASSES))
    np.testing.assert_array_equal(evaluated.visibility, discrete_visibility(heat, seg, bones).numpy())
    np.testing.assert_array_equal(evaluated.on_bone, argmax_on_bone(image_argmax(heat, 4), seg, bones).numpy())
    assert evaluated.segmentation.shape[-2:] == (32, 32)
    # eval's v̂ with the image edge moved by 0 is v̂; moved out by the whole margin, every found peak counts.
    from pelmark.evaluate.visibility import bordered_visibility

    np.testing.assert_array_equal(bordered_visibility(evaluated, 0), evaluated.visibility)
    found = evaluated.peak_probability >= 0.5
    assert ((bordered_visibility(evaluated, 4) > 0) == found).all()


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
    assert plain.visibility_absent_weight == 2.0  # seed 003: a false "present" costs double
    assert resolve_config(Strategy.SEG_INFORMED, {}, {"visibility_absent_weight": 1.0}).visibility_absent_weight == 1.0
    with pytest.raises(PelmarkError, match="visibility-absent-weight"):
        resolve_config(Strategy.SEG_INFORMED, {}, {"visibility_absent_weight": 0.0})


def test_the_demo_preset_ramps_seed_003s_visibility_weight_in_and_leaves_the_other_strategies_alone():
    from pelmark.train.config import Strategy, resolve_config
    from pelmark.train.presets import TRAIN_PRESETS

    demo = TRAIN_PRESETS["demo"]
    seg = resolve_config(Strategy.SEG_INFORMED, demo)
    assert (seg.kl_weight, seg.visibility_weight, seg.canvas_margin_px, seg.visibility_absent_weight) == (1.0, 10.0, 16, 1.0)
    # The ramp covers the first half of the run: 24 epochs of the demo store's 36 batches.
    assert seg.epochs == 24 and seg.visibility_warmup_steps == seg.epochs * 36 // 2
    # The canvas fits the encoder's stride: (128 + 2 * 16) / 2**4 is whole.
    assert (seg.size + 2 * seg.canvas_margin_px) % 2**seg.encoder_depth == 0
    for strategy in (Strategy.BASELINE, Strategy.FINETUNE):
        other = resolve_config(strategy, demo, {"init": "x"} if strategy is Strategy.FINETUNE else None)
        assert (other.kl_weight, other.visibility_warmup_steps, other.canvas_margin_px) == (0.1, 0, 0)
        assert other.visibility_absent_weight == 2.0 and other.epochs == (1 if strategy is Strategy.FINETUNE else 16)

"""Visibility metrics of pelmark eval: the threshold, accuracy / precision / recall, both-present RMSE, Dice, and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cohort_fixtures import BONE_CLASSES, write_bead_store
from pelmark.cli import app
from pelmark.evaluate.predict import Predictions, SplitTruth
from pelmark.evaluate.visibility import (
    PresenceRule,
    Score,
    bordered_visibility,
    choose_border,
    choose_threshold,
    dice_per_class,
    presence,
    visibility_metrics,
)
from pelmark.geometry import Camera
from pelmark.store import Split
from pelmark.train.config import Strategy, resolve_config
from pelmark.train.loop import train

CAMERA = Camera.centered(32, 32, spacing_mm=2.0)


def _predictions(true_px, visible, predicted_px, peaks=None, present=None, v_hat=None, on_bone=None) -> Predictions:
    n, l = np.asarray(visible).shape
    truth = SplitTruth(
        split=Split.NOVEL_SUBJECT,
        rows=np.arange(n),
        subject_ids=np.array(["s"] * n, dtype=object),
        true_px=np.asarray(true_px, dtype=np.float64),
        visible=np.asarray(visible, dtype=bool),
        poses=np.zeros((n, 6)),
        landmarks_3d=np.zeros((n, l, 3)),
        model_camera=CAMERA,
        store_camera=CAMERA,
    )
    return Predictions("m", truth, np.asarray(predicted_px, dtype=np.float64), peaks, present=present, visibility=v_hat, on_bone=on_bone)


def test_the_threshold_is_the_best_split_of_the_validation_peaks():
    # Peaks of absent landmarks 0.1, 0.3; of present ones 0.2, 0.6, 0.9. Calling >= 0.6 present gets 4 of 5;
    # >= 0.2 also gets 4 of 5 (0.3 wrong), and is the lower: ties go to the lowest threshold.
    peaks = np.array([0.1, 0.3, 0.2, 0.6, 0.9])
    visible = np.array([False, False, True, True, True])
    assert choose_threshold(peaks, visible) == pytest.approx(0.2)
    # Separable peaks: the threshold is the lowest present peak.
    assert choose_threshold(np.array([0.1, 0.2, 0.7, 0.8]), np.array([False, False, True, True])) == pytest.approx(0.7)
    # Nothing present: a threshold above every peak.
    assert choose_threshold(np.array([0.4, 0.9]), np.array([False, False])) > 1.0


def test_the_v_hat_level_that_means_present_is_chosen_like_a_threshold():
    # Seed 003's v̂ of four landmarks: 0, 0.5, 0.5, 1. Truth: only the v̂ = 1 one is present.
    # v̂ >= 0.5 (the paper's v̂ > 0) gets 2 of 4; v̂ >= 1 gets 4 of 4.
    v_hat = np.array([0.0, 0.5, 0.5, 1.0])
    assert choose_threshold(v_hat, np.array([False, False, False, True])) == pytest.approx(1.0)
    # Both off-bone peaks truly present: v̂ >= 0.5 gets 4 of 4.
    assert choose_threshold(v_hat, np.array([False, True, True, True])) == pytest.approx(0.5)
    # One of each: 3 of 4 either way; the tie goes to the lower level, the paper's rule.
    assert choose_threshold(v_hat, np.array([False, True, False, True])) == pytest.approx(0.5)


def test_presence_thresholds_the_rule_s_score():
    true_px = np.zeros((1, 3, 2))
    visible = [[True, True, False]]
    pred = _predictions(true_px, visible, true_px, peaks=np.array([[0.9, 0.2, 0.8]]), v_hat=np.array([[1.0, 0.5, 0.0]]))
    strict = PresenceRule(own=False, threshold=1.0, source="test", score=Score.VISIBILITY)
    np.testing.assert_array_equal(presence(pred, strict), [[True, False, False]])
    np.testing.assert_array_equal(presence(pred, PresenceRule(own=False, threshold=0.5, score=Score.VISIBILITY)), [[True, True, False]])
    np.testing.assert_array_equal(presence(pred, PresenceRule(own=False, threshold=0.5)), [[True, False, True]])
    assert strict.describe() == "v̂ >= 1 (test)"
    # A model without v̂ cannot be thresholded on it.
    with pytest.raises(ValueError, match="no v̂"):
        presence(_predictions(true_px, visible, true_px, peaks=np.array([[0.9, 0.2, 0.8]])), strict)


def _edge_case(visible):
    """Five landmarks on a 32 px image, all peaks 0.9 and on their bones but the last: argmax 2 px and 1 px outside
    the left edge, on the edge pixel, 1 px in, and 1 px outside but off its bone."""
    predicted = np.array([[[-2.0, 10.0], [-1.0, 10.0], [0.0, 10.0], [1.0, 10.0], [-1.0, 20.0]]])
    v_hat = np.array([[0.0, 0.0, 1.0, 1.0, 0.0]])  # what discrete_visibility gives: outside is 0
    return _predictions(np.zeros((1, 5, 2)), [visible], predicted, peaks=np.full((1, 5), 0.9), v_hat=v_hat, on_bone=np.array([[True, True, True, True, False]]))


def test_moving_the_image_edge_by_hand():
    pred = _edge_case([True] * 5)
    np.testing.assert_array_equal(pred.edge_distance(), [[-1.5, -0.5, 0.5, 1.5, -0.5]])
    # d = 0 is v̂ itself; +1 px finds the argmax 1 px out (1 on its bone, 0.5 off it); +2 also the one 2 px out;
    # -1 drops the edge pixel.
    np.testing.assert_array_equal(bordered_visibility(pred, 0), pred.visibility)
    np.testing.assert_array_equal(bordered_visibility(pred, 1), [[0.0, 1.0, 1.0, 1.0, 0.5]])
    np.testing.assert_array_equal(bordered_visibility(pred, 2), [[1.0, 1.0, 1.0, 1.0, 0.5]])
    np.testing.assert_array_equal(bordered_visibility(pred, -1), [[0.0, 0.0, 0.0, 1.0, 0.0]])
    # A peak below 0.5 is not found wherever it lies.
    low = dataclasses.replace(pred, peak_probability=np.full((1, 5), 0.4))
    assert not bordered_visibility(low, 2).any()
    # Moving the edge needs the on-bone calls of the argmax.
    with pytest.raises(ValueError, match="on-bone"):
        bordered_visibility(dataclasses.replace(pred, on_bone=None), 1)
    rule = PresenceRule(own=False, threshold=1.0, source="test", score=Score.VISIBILITY, border_px=1)
    np.testing.assert_array_equal(presence(pred, rule), [[False, True, True, True, False]])
    assert rule.describe() == "v̂ >= 1, image edge moved +1 px (test)"


def test_the_edge_is_chosen_with_the_level_on_validation_images():
    # The one 1 px out is truly present (its argmax is 1 px off), the one 2 px out is not: with a 16 px margin the
    # best rule is v̂ >= 1 with the edge moved out by 1 px (5 of 5); v̂ >= 0.5 at +1 would add the off-bone one.
    pred = _edge_case([False, True, True, True, False])
    assert choose_border(pred, margin_px=16) == (pytest.approx(1.0), 1)
    # A plain model's argmax cannot leave the image: the search stops at d = 0 (4 of 5, first at d = 0).
    assert choose_border(pred, margin_px=0) == (pytest.approx(1.0), 0)
    # Only the landmark 1 px in truly present: moving the edge in by 1 px drops the edge pixel's call (5 of 5).
    edge_absent = _edge_case([False, False, False, True, False])
    assert choose_border(edge_absent, margin_px=16) == (pytest.approx(1.0), -1)
    # Nothing to gain anywhere: d = 0 wins the tie.
    assert choose_border(_edge_case([False, False, True, True, False]), margin_px=16)[1] == 0


def test_accuracy_precision_recall_and_rmse_over_both_present_by_hand():
    # 2 images x 2 landmarks. Truth: (present, present), (present, absent).
    true_px = [[[0, 0], [10, 10]], [[5, 5], [0, 0]]]
    visible = [[True, True], [True, False]]
    # Predictions 3 px off for landmark 0 in image 0 and 4 px for landmark 1 in image 0; 5 px for landmark 0 in image 1.
    predicted = [[[3, 0], [10, 14]], [[5, 10], [20, 20]]]
    # Calls: image 0 (present, absent), image 1 (present, present): one false negative, one false positive.
    present = np.array([[True, False], [True, True]])
    pred = _predictions(true_px, visible, predicted, present=present)
    metrics = visibility_metrics(pred, presence(pred, PresenceRule(own=True)))
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    assert metrics["precision"] == pytest.approx(2 / 3)  # TP 2 (landmark 0 twice), FP 1
    assert metrics["recall"] == pytest.approx(2 / 3)  # FN 1 (landmark 1 of image 0)
    # Both present: landmark 0 in both images (3 and 5 px): RMSE sqrt((9 + 25) / 2); landmark 1 never.
    assert metrics["rmse_both_present_px"] == pytest.approx(math.sqrt(17.0))
    assert metrics["n_both_present"] == 2
    # By threshold, for a model without a visibility output.
    peaks = np.array([[0.9, 0.2], [0.8, 0.7]])
    thresholded = presence(_predictions(true_px, visible, predicted, peaks=peaks), PresenceRule(own=False, threshold=0.5))
    np.testing.assert_array_equal(thresholded, present)


def test_dice_per_class_by_hand():
    predicted = np.array([[[0, 1, 1, 2]]])
    labels = np.array([[[0, 1, 2, 2]]])
    # Class 1: |P| 2, |T| 1, overlap 1 -> 2/3. Class 2: |P| 1, |T| 2, overlap 1 -> 2/3. Class 3: both empty -> NaN.
    scores = dice_per_class(predicted, labels, 3)
    assert scores[:2] == pytest.approx([2 / 3, 2 / 3]) and math.isnan(scores[2])


TINY = dict(size=32, encoder="resnet18", encoder_depth=3, batch_size=2, workers=0, device="cpu", checkpoint_every=1, lr=1e-3, epochs=1)


@pytest.mark.slow
def test_eval_reports_visibility_for_every_model_and_dice_for_seg_informed(tmp_path):
    store = write_bead_store(tmp_path / "cohort", bones=True)
    train(resolve_config(Strategy.BASELINE, {}, TINY), store, tmp_path / "baseline", progress=False)
    train(resolve_config(Strategy.SEG_INFORMED, {}, TINY), store, tmp_path / "seg-informed", progress=False)
    result = CliRunner().invoke(
        app,
        ["eval", str(tmp_path / "baseline"), str(tmp_path / "seg-informed"), "--store", str(store), "--out", str(tmp_path / "eval"),
         "--workers", "0", "--device", "cpu", "--bootstrap", "20", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Landmark visibility" in result.output
    assert "visibility, 'present' is: baseline: peak sigmoid >= " in result.output and "seg-informed: v̂ >= " in result.output
    with open(tmp_path / "eval" / "visibility.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_model = {(r["split"], r["model"]): r for r in rows}
    assert set(by_model) == {(s, m) for s in ("novel_view", "novel_subject") for m in ("baseline", "seg-informed")}
    assert "validation images" in by_model["novel_subject", "baseline"]["presence"]
    assert by_model["novel_subject", "seg-informed"]["presence"].startswith("v̂ >= ")
    assert "validation images" in by_model["novel_subject", "seg-informed"]["presence"]
    for row in rows:
        assert 0.0 <= float(row["accuracy_lo"]) <= float(row["accuracy"]) <= float(row["accuracy_hi"]) <= 1.0
    assert all(by_model["novel_subject", "baseline"][f"dice_{c}"] == "" for c in BONE_CLASSES)
    assert all(0.0 <= float(by_model["novel_subject", "seg-informed"][f"dice_{c}"]) <= 1.0 for c in BONE_CLASSES)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["visibility"]["classes"] == list(BONE_CLASSES)
    table = (tmp_path / "eval" / "table1.csv").read_text()
    assert "seg-informed" in table

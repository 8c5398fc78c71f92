"""pelmark.evaluate.refine: registration-consistent landmarks from the robust pose of the found ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cohort_fixtures import write_bead_store
from pelmark.evaluate.pose import Registration, pose_metrics
from pelmark.evaluate.predict import Predictions, SplitTruth, read_truth
from pelmark.evaluate.refine import RefineFlag, refine
from pelmark.geometry import Camera, project
from pelmark.store import Split

SIZE = 32
STORE_CAMERA = Camera.centered(256, spacing_mm=1.5)  # 384 mm detector; about 320 mm at the isocentre
MODEL_CAMERA = STORE_CAMERA.resized(128, 128)  # 1 model px = 2 detector px


def _eight_landmark_truth(n_images: int = 4) -> SplitTruth:
    """8 landmarks of a pelvis-sized point set under random poses, projected with pelmark.geometry."""
    rng = np.random.default_rng(0)
    points = rng.uniform(-80.0, 80.0, size=(8, 3))
    poses = np.concatenate([rng.uniform(-0.2, 0.2, (n_images, 3)), rng.uniform(-15.0, 15.0, (n_images, 3))], axis=1)
    points_3d = np.broadcast_to(points, (n_images, 8, 3)).copy()
    true_px = project(torch.from_numpy(points_3d), torch.from_numpy(poses), MODEL_CAMERA).numpy()
    assert MODEL_CAMERA.contains(torch.from_numpy(true_px)).all()
    return SplitTruth(
        split=Split.NOVEL_VIEW,
        rows=np.arange(n_images),
        subject_ids=np.array(["s"] * n_images, dtype=object),
        true_px=true_px,
        visible=np.ones((n_images, 8), dtype=bool),
        poses=poses,
        landmarks_3d=points_3d,
        model_camera=MODEL_CAMERA,
        store_camera=STORE_CAMERA,
    )


def _refined(predictions: Predictions):
    return refine(predictions, pose_metrics(predictions, Registration.ROBUST))


def test_found_is_peak_at_least_half_and_argmax_inside():
    truth = _eight_landmark_truth(1)
    predicted = truth.true_px.copy()
    predicted[0, 1] = [-3.0, 10.0]  # outside the image
    peaks = np.full((1, 8), 0.9)
    peaks[0, 2], peaks[0, 3] = 0.5, 0.49
    found = Predictions("m", truth, predicted, peaks).found()
    np.testing.assert_array_equal(found[0], [True, False, True, False, True, True, True, True])
    assert Predictions("reference", truth, truth.true_px).found().all()  # no heatmap: every point inside counts


def test_a_margin_model_also_votes_with_the_peaks_it_finds_outside_the_image():
    truth = _eight_landmark_truth()
    predicted = truth.true_px.copy()
    predicted[:, 0] = [-5.0, 20.0]  # in a canvas margin, left of the image
    predicted[:, 1] = [-4.0, 30.0]
    peaks = np.full((4, 8), 0.9)
    peaks[:, 1] = 0.3  # found nowhere
    visibility = np.ones((4, 8))
    visibility[:, :2] = 0.0  # outside the image: v̂ = 0, not present
    seg = Predictions("seg", truth, predicted, peaks, present=visibility > 0, visibility=visibility)
    assert not seg.found()[:, :2].any()  # presence is about the image
    np.testing.assert_array_equal(seg.votes()[0], [True, False, True, True, True, True, True, True])
    # A plain model's argmax never leaves the image, so this changes nothing for it.
    inside = Predictions("m", truth, truth.true_px, peaks)
    np.testing.assert_array_equal(inside.votes(), inside.found())


def test_a_model_with_a_visibility_output_votes_only_the_landmarks_it_places_on_their_bone():
    truth = _eight_landmark_truth()
    predicted = truth.true_px.copy()
    predicted[:, 3] += [25.0, -18.0]  # a gross error that the model itself places off its bone
    visibility = np.ones((4, 8))
    visibility[:, 3], visibility[:, 6] = 0.5, 0.0
    peaks = np.ones((4, 8))
    peaks[:, 6] = 0.2  # v̂ = 0: not present
    seg = Predictions("seg", truth, predicted, peaks, present=visibility > 0, visibility=visibility)
    np.testing.assert_array_equal(seg.found()[0], [True, True, True, True, True, True, False, True])
    np.testing.assert_array_equal(seg.votes()[0], [True, True, True, False, True, True, False, True])
    plain = Predictions("m", truth, predicted, peaks)
    np.testing.assert_array_equal(plain.votes(), plain.found())  # no visibility output: the found ones vote
    refinement = _refined(seg)
    np.testing.assert_allclose(refinement.predictions.predicted_px, truth.true_px, atol=1e-3)
    assert [refinement.flags(i, 3) for i in range(4)] == [RefineFlag.NOT_FOUND] * 4  # it did not vote
    assert [_refined(plain).flags(i, 3) for i in range(4)] == [RefineFlag.OUTLIER] * 4  # it voted, RANSAC dropped it


def test_exact_detections_refine_to_the_true_projections(tmp_path):
    truth = read_truth(write_bead_store(tmp_path), Split.NOVEL_SUBJECT, SIZE)
    refinement = _refined(Predictions("exact", truth, truth.true_px.copy(), np.ones(truth.visible.shape)))
    assert refinement.predictions.model == "exact+reg"
    assert not refinement.failed.any() and refinement.found.all() and refinement.inliers.all()
    np.testing.assert_allclose(refinement.predictions.predicted_px, truth.true_px, atol=1e-3)
    assert all(refinement.flags(i, l) == "" for i in range(truth.n_images) for l in range(truth.true_px.shape[1]))


def test_a_gross_outlier_among_eight_is_rejected():
    truth = _eight_landmark_truth()
    predicted = truth.true_px.copy()
    predicted[:, 3] += [25.0, -18.0]  # 31 model px = 62 detector px off, far past RANSAC's 10 px
    refinement = _refined(Predictions("m", truth, predicted, np.ones((4, 8))))
    assert not refinement.failed.any()
    assert not refinement.inliers[:, 3].any() and refinement.inliers[:, [0, 1, 2, 4, 5, 6, 7]].all()
    np.testing.assert_allclose(refinement.predictions.predicted_px, truth.true_px, atol=1e-3)
    assert [refinement.flags(i, 3) for i in range(4)] == [RefineFlag.OUTLIER] * 4


def test_a_landmark_not_found_gets_its_projection():
    truth = _eight_landmark_truth()
    predicted = truth.true_px.copy()
    predicted[:, 5] = [0.0, 0.0]  # a low-confidence guess in the corner: it must not vote
    peaks = np.ones((4, 8))
    peaks[:, 5] = 0.1
    refinement = _refined(Predictions("m", truth, predicted, peaks))
    np.testing.assert_allclose(refinement.predictions.predicted_px, truth.true_px, atol=1e-3)
    assert [refinement.flags(i, 5) for i in range(4)] == [RefineFlag.NOT_FOUND] * 4
    assert refinement.counts() == {
        "images": 4, "registration_failed": 0, "registration_unconfirmed": 0, "landmarks": 32, "not_found": 4,
        "outliers": 0, "outside": 0,
    }  # fmt: skip


def test_failed_registration_keeps_the_raw_argmax():
    truth = _eight_landmark_truth()
    predicted = truth.true_px + 2.0
    peaks = np.ones((4, 8))
    peaks[1:, 2:] = 0.2  # images 1-3: only 2 landmarks found, too few for a pose
    refinement = _refined(Predictions("m", truth, predicted, peaks))
    np.testing.assert_array_equal(refinement.failed, [False, True, True, True])
    np.testing.assert_array_equal(refinement.predictions.predicted_px[1:], predicted[1:])
    assert refinement.flags(1, 0) == RefineFlag.FAILED and refinement.counts()["registration_failed"] == 3


def test_a_pose_with_no_inlier_beyond_its_minimal_subset_keeps_the_raw_argmax():
    truth = _eight_landmark_truth()
    predicted = truth.true_px.copy()
    peaks = np.ones((4, 8))
    peaks[:2, 4:] = 0.2  # images 0-1: four landmarks found, the least a pose needs, so none can confirm it
    peaks[2, 5:] = 0.2  # image 2: five found, one beyond the minimal subset
    predicted[peaks < 0.5] = [0.0, 0.0]  # the landmarks not found sit in a corner
    refinement = _refined(Predictions("m", truth, predicted, peaks))
    np.testing.assert_array_equal(refinement.unconfirmed, [True, True, False, False])
    assert not refinement.failed.any()
    np.testing.assert_array_equal(refinement.predictions.predicted_px[:2], predicted[:2])  # raw, corners included
    np.testing.assert_allclose(refinement.predictions.predicted_px[2:], truth.true_px[2:], atol=1e-3)  # projected
    assert refinement.flags(0, 0) == RefineFlag.UNCONFIRMED and refinement.flags(2, 7) == RefineFlag.NOT_FOUND
    assert refinement.counts()["registration_unconfirmed"] == 2


def test_refine_needs_the_robust_registration():
    truth = _eight_landmark_truth(1)
    predictions = Predictions("m", truth, truth.true_px.copy(), np.ones((1, 8)))
    with pytest.raises(ValueError, match="robust"):
        refine(predictions, pose_metrics(predictions, Registration.PLAIN))


def test_registered_presence_calls_a_landmark_outside_the_image_absent():
    import dataclasses

    from pelmark.evaluate.visibility import PresenceRule, presence, registered_presence, visibility_metrics

    base = _eight_landmark_truth()
    points = base.landmarks_3d.copy()
    points[:, 7] = points[:, 0] + [400.0, 0.0, 0.0]  # 40 cm to the side: off a 32 cm field of view
    true_px = project(torch.from_numpy(points), torch.from_numpy(base.poses), MODEL_CAMERA).numpy()
    visible = MODEL_CAMERA.contains(torch.from_numpy(true_px)).numpy()
    assert not visible[:, 7].any() and visible[:, :7].all()
    truth = dataclasses.replace(base, landmarks_3d=points, true_px=true_px, visible=visible)
    predicted = true_px.copy()
    predicted[:, 7] = [120.0, 64.0]  # the detector puts it at the edge, with a confident peak
    peaks = np.full((4, 8), 0.9)
    peaks[3, 4:] = 0.1  # image 3: four landmarks found, the least a pose needs, so its pose is unconfirmed
    raw = Predictions("m", truth, predicted, peaks)
    rule = PresenceRule(own=False, threshold=0.5, source="test")
    assert presence(raw, rule)[:3, 7].all()  # the heatmap calls it present
    refinement = _refined(raw)
    np.testing.assert_array_equal(refinement.unconfirmed, [False, False, False, True])
    registered, registered_rule = registered_presence(raw, rule, refinement)
    present = presence(registered, registered_rule)
    np.testing.assert_array_equal(present[:3], visible[:3])  # the anatomy puts it off the image
    np.testing.assert_array_equal(present[3], presence(raw, rule)[3])  # unconfirmed: the run's own calls
    assert visibility_metrics(registered, present)["accuracy"] > visibility_metrics(raw, presence(raw, rule))["accuracy"]
    assert registered.model == "m+reg" and "registered" in registered_rule.describe()

"""pelmark.evaluate: Table-1 RMSE, units, the mean-position reference, pose metrics, outputs, bad inputs."""

from __future__ import annotations

import collections
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cohort_fixtures import NAMES, write_bead_store
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.evaluate.pose import (
    SUCCESS_THRESHOLDS_MM,
    PoseErrors,
    Registration,
    mean_target_registration_error,
    pose_metrics,
)
from pelmark.evaluate.predict import Predictions, SplitTruth, read_truth
from pelmark.evaluate.reference import fit_mean_position, mean_positions, predict_mean_position
from pelmark.evaluate.runner import EvalSettings, check_out, evaluate_runs, parse_splits
from pelmark.evaluate.tables import format_table, table_row, table_text, diverged_row
from pelmark.evaluate.units import Unit, point_errors
from pelmark.geometry import Camera
from pelmark.store import Split, open_store
from pelmark.train.config import Strategy, TrainConfig
from pelmark.train.loop import train

SIZE = 32
CPU = dict(progress=False, device="cpu", workers=0)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """3 bead subjects (the last novel_subject) x 4 views of 48 x 48 (4 mm pixels); 1 novel view per train subject."""
    return write_bead_store(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> dict[str, Path]:
    """run_a (trained, 1 step), run_b (a copy of it) and run_div (status DIV, no checkpoint)."""
    root = tmp_path_factory.mktemp("runs")
    config = TrainConfig(
        strategy=Strategy.BASELINE, size=SIZE, encoder="resnet18", encoder_depth=3, batch_size=2, max_steps=1,
        workers=0, device="cpu", checkpoint_every=0,
    )  # fmt: skip
    train(config, store, root / "run_a", progress=False)
    shutil.copytree(root / "run_a", root / "run_b")
    shutil.copytree(root / "run_a", root / "run_div")
    shutil.rmtree(root / "run_div" / "checkpoints")
    _edit_run_json(root / "run_div", status="DIV", reason="step 1: non-finite loss (nan)")
    return {name: root / name for name in ("run_a", "run_b", "run_div")}


@pytest.fixture(scope="module")
def results(store, runs, tmp_path_factory):
    """One evaluation of run_a, run_div, run_b (in that order) on the default splits."""
    out = tmp_path_factory.mktemp("eval") / "results"
    report = evaluate_runs([runs["run_a"], runs["run_div"], runs["run_b"]], store, out, EvalSettings(samples=2, **CPU))
    return report, out


def _edit_run_json(run_dir: Path, **changes) -> None:
    path = run_dir / "run.json"
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


def _store_with_splits(store: Path, target: Path, mapping: dict[Split, Split]) -> Path:
    """A copy of ``store`` with split codes renamed (e.g. no novel_subject, or no train images)."""
    shutil.copytree(store, target)
    group = open_store(target, mode="r+")
    codes = np.asarray(group["split"][:])
    new = codes.copy()
    for old, replacement in mapping.items():
        new[codes == old] = replacement
    group["split"][:] = new
    return target


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _hand_truth(true_px, visible, camera: Camera, split=Split.NOVEL_VIEW) -> SplitTruth:
    true_px = np.asarray(true_px, dtype=np.float64)
    n, landmarks = true_px.shape[:2]
    return SplitTruth(
        split=split,
        rows=np.arange(n),
        subject_ids=np.array(["s"] * n, dtype=object),
        true_px=true_px,
        visible=np.asarray(visible, dtype=bool),
        poses=np.zeros((n, 6)),
        landmarks_3d=np.zeros((n, landmarks, 3)),
        model_camera=camera,
        store_camera=camera,
    )


# ---------------------------------------------------------------- units and metrics, by hand


def test_point_errors_in_every_unit_by_hand():
    # Detector 48 px wide, 4 mm pixels along x and 2 mm along y, sdd/sid = 1020/850 = 1.2; model size 32.
    store_camera = Camera.centered(48, sdd_mm=1020.0, spacing_mm=4.0, sid_mm=850.0, spacing_y_mm=2.0)
    model_camera = store_camera.resized(32, 32)
    true = np.array([[10.0, 20.0], [10.0, 20.0]])
    predicted = np.array([[11.0, 20.0], [10.0, 21.0]])  # 1 model px along x, then along y
    errors = point_errors(predicted, true, model_camera, store_camera)
    # 1 model px = 48/32 = 1.5 detector px; x: 1.5 * 4 mm = 6 mm, / 1.2 = 5 mm; y: 1.5 * 2 mm = 3 mm, / 1.2 = 2.5 mm.
    np.testing.assert_allclose(errors[Unit.MODEL_PX], [1.0, 1.0])
    np.testing.assert_allclose(errors[Unit.DETECTOR_PX], [1.5, 1.5])
    np.testing.assert_allclose(errors[Unit.DETECTOR_MM], [6.0, 3.0])
    np.testing.assert_allclose(errors[Unit.ISOCENTRE_MM], [5.0, 2.5])


def test_table_row_rmse_and_mean_by_hand():
    camera = Camera.centered(48)
    true = [[[10.0, 10.0], [20.0, 20.0]], [[5.0, 5.0], [30.0, 30.0]]]
    predicted = np.array([[[13.0, 14.0], [22.0, 20.0]], [[5.0, 5.0], [0.0, 0.0]]])
    visible = [[True, True], [True, False]]  # image 1's far-off L2 is invisible: left out
    pred = Predictions("m", _hand_truth(true, visible, camera), predicted)
    row = table_row(pred, Unit.MODEL_PX, "COMPLETE")
    # L1: errors 5 and 0 -> sqrt(25 / 2) = 3.5355; L2: error 2 (once) -> 2; Mean = (3.5355 + 2) / 2 = 2.7678.
    np.testing.assert_allclose(row.rmse, [math.sqrt(12.5), 2.0])
    assert row.mean == pytest.approx((math.sqrt(12.5) + 2.0) / 2)
    assert row.cells(2) == ["novel_view", "m", "2.77", "3.54", "2.00"]
    assert np.isnan(pred.errors()[Unit.MODEL_PX][1, 1])


def test_landmark_never_visible_is_undefined_and_div_row_reads_as_the_paper():
    camera = Camera.centered(48)
    pred = Predictions("m", _hand_truth([[[1.0, 1.0], [2.0, 2.0]]], [[True, False]], camera), np.array([[[1.0, 4.0], [2.0, 2.0]]]))
    row = table_row(pred, Unit.MODEL_PX, "COMPLETE")
    assert row.cells(2) == ["novel_view", "m", "3.00", "3.00", "n/a"]  # Mean over defined landmarks only
    text = table_text([row, diverged_row("novel_view", "x")], 2)
    assert text.splitlines() == ["split,model,Mean,L1,L2", "novel_view,m,3.00,3.00,n/a", "novel_view,x,DIV,-,-"]
    aligned = format_table([row, diverged_row("novel_view", "x")], 2).splitlines()
    assert aligned[0].split() == ["split", "model", "Mean", "L1", "L2"] and aligned[2].split() == ["novel_view", "x", "DIV", "-", "-"]


# ---------------------------------------------------------------- the mean-position reference


def test_mean_positions_by_hand():
    points = np.array([[[0.0, 0.0], [10.0, 10.0], [7.0, 7.0]], [[2.0, 4.0], [99.0, 99.0], [1.0, 1.0]]])
    visible = np.array([[True, True, False], [True, False, False]])
    means = mean_positions(points, visible)
    np.testing.assert_allclose(means[:2], [[1.0, 2.0], [10.0, 10.0]])
    assert np.isnan(means[2]).all()


def test_reference_is_the_train_mean_mapped_to_model_pixels(store):
    group = open_store(store)
    train_rows = [r for r in range(12) if group["split"][r] == Split.TRAIN]
    assert len(train_rows) == 6  # 2 train subjects x (4 views - 1 novel view)
    points = np.asarray(group["landmarks_2d"][:], dtype=np.float64)
    visible = np.asarray(group["visible"][:])
    hand = np.array([np.mean([points[r, l] for r in train_rows if visible[r, l]], axis=0) for l in range(len(NAMES))])
    reference = fit_mean_position(store)
    assert reference.train_images == 6
    np.testing.assert_allclose(reference.mean_detector_px, hand, atol=1e-9)
    truth = read_truth(store, Split.NOVEL_SUBJECT, SIZE)
    pred = predict_mean_position(reference, truth)
    # Resizing 48 -> 32 maps pixel edges to pixel edges: x' = (x + 0.5) * 32 / 48 - 0.5.
    expected = (hand + 0.5) * SIZE / 48 - 0.5
    assert pred.predicted_px.shape == (4, len(NAMES), 2)
    np.testing.assert_allclose(pred.predicted_px, np.broadcast_to(expected, (4, len(NAMES), 2)), atol=1e-9)


# ---------------------------------------------------------------- pose metrics


def test_mtre_and_pose_summary_by_hand():
    points = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 5.0]]], dtype=torch.float64)
    truth = torch.zeros(1, 6, dtype=torch.float64)
    shifted = torch.tensor([[0.0, 0.0, 0.0, 3.0, 4.0, 0.0]], dtype=torch.float64)
    turned = torch.tensor([[0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # Every point moves by (3, 4, 0): 5 mm. A quarter turn about z moves (10,0,0) to (0,10,0) (10√2 mm), not (0,0,5).
    assert float(mean_target_registration_error(shifted, truth, points)) == pytest.approx(5.0)
    assert float(mean_target_registration_error(turned, truth, points)) == pytest.approx(10 * math.sqrt(2) / 2)
    errors = PoseErrors(
        Registration.PLAIN,
        rotation_deg=np.array([1.0, 3.0, 90.0]),
        translation_mm=np.array([2.0, 4.0, 500.0]),
        mtre_mm=np.array([4.0, 8.0, 1.0]),
        degenerate=np.array([False, False, True]),
    )
    summary = errors.summary((5.0, 10.0))
    # Means/medians over the two non-degenerate images; the degenerate one fails every threshold.
    assert summary["degenerate"] == 1 and summary["images"] == 3
    assert summary["rotation_deg_mean"] == pytest.approx(2.0) and summary["mtre_mm_median"] == pytest.approx(6.0)
    assert summary["success_5mm"] == pytest.approx(1 / 3) and summary["success_10mm"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("registration", list(Registration))
def test_true_landmarks_register_to_the_true_pose(store, registration):
    truth = read_truth(store, Split.NOVEL_SUBJECT, SIZE)
    errors = pose_metrics(Predictions("oracle", truth, truth.true_px.copy()), registration)
    assert not errors.degenerate.any()
    assert errors.rotation_deg.max() < 1e-3
    assert errors.translation_mm.max() < 1e-2
    assert errors.mtre_mm.max() < 1e-2
    assert all(errors.success(t).all() for t in SUCCESS_THRESHOLDS_MM)


def test_pose_of_perturbed_landmarks_is_wrong(store):
    truth = read_truth(store, Split.NOVEL_SUBJECT, SIZE)
    shifted = truth.true_px + np.array([3.0, 0.0])  # 3 model px = 4.5 detector px sideways, every landmark
    errors = pose_metrics(Predictions("shifted", truth, shifted), Registration.PLAIN)
    assert (errors.mtre_mm > 1.0).all()


# ---------------------------------------------------------------- outputs of a whole evaluation


def test_table1_csv(results, store):
    report, out = results
    rows = _read_csv(out / "table1.csv")
    assert rows[0] == ["split", "model", "Mean", "L1", "L2", "L3", "L4", "L5"]
    assert [r[:2] for r in rows[1:]] == [
        [split, model] for split in ("novel_view", "novel_subject") for model in ("run_a", "run_div", "run_b", "mean-position")
    ]
    for row in rows[1:]:
        if row[1] == "run_div":
            assert row[2:] == ["DIV", "-", "-", "-", "-", "-"]
            continue
        values = [float(v) for v in row[2:]]
        assert all(v == round(v, 2) and len(s.split(".")[1]) == 2 for v, s in zip(values, row[2:]))
        assert values[0] == pytest.approx(np.mean(values[1:]), abs=0.0101)  # each rounded by at most 0.005
    # run_b is a copy of run_a: the same numbers.
    assert rows[1][2:] == rows[3][2:]
    for name in ("table1_detector_px.csv", "table1_mm_detector.csv", "table1_mm_isocentre.csv"):
        other = _read_csv(out / name)
        assert other[0] == rows[0] and [r[:2] for r in other[1:]] == [r[:2] for r in rows[1:]]
    # Every error scales alike: detector px = 1.5 model px, detector mm = 4 x that, isocentre mm = / 1.2.
    tables = json.loads((out / "summary.json").read_text())["tables"]
    for model_row, det_row, iso_row in zip(*(tables[u]["rows"] for u in ("model_px", "detector_px", "isocentre_mm"))):
        if model_row["Mean"] == "DIV":
            assert det_row["Mean"] == iso_row["Mean"] == "DIV"
            continue
        for key in ("Mean", "L1", "L5"):
            assert det_row[key] == pytest.approx(1.5 * model_row[key], rel=1e-5)
            assert iso_row[key] == pytest.approx(1.5 * 4.0 / 1.2 * model_row[key], rel=1e-5)
    assert [r.model for r in report.table1] == [r[1] for r in rows[1:]]


def test_per_image_csv(results):
    _, out = results
    rows = _read_csv(out / "per_image.csv")
    assert rows[0] == [
        "split", "model", "row", "subject", "landmark", "visible", "pred_x", "pred_y", "true_x", "true_y",
        "error_model_px", "error_detector_px", "error_detector_mm", "error_isocentre_mm",
        "peak_probability", "found", "refine_flag",
    ]  # fmt: skip
    # (2 novel_view + 4 novel_subject images) x 5 landmarks x (run_a, run_b, mean-position); run_div is not evaluated.
    assert len(rows) - 1 == (2 + 4) * 5 * 3
    assert {r[1] for r in rows[1:]} == {"run_a", "run_b", "mean-position"}
    for r in rows[1:]:
        assert r[5] == "1"  # every bead is on the detector in this store
        error = math.hypot(float(r[6]) - float(r[8]), float(r[7]) - float(r[9]))
        assert float(r[10]) == pytest.approx(error, abs=2e-3)
        assert float(r[11]) == pytest.approx(1.5 * float(r[10]), abs=1e-3)
        if r[1] == "mean-position":  # no heatmap: no peak, no decision
            assert r[14:] == ["", "", ""]
        else:
            assert r[15] == str(int(float(r[14]) >= 0.5)) and r[16] == ""


def test_pose_csv_and_summary(results, store):
    _, out = results
    rows = list(csv.DictReader(open(out / "pose.csv", newline="")))
    assert len(rows) == 2 * 4 * 2  # splits x (3 runs + reference) x (lm, robust)
    div = [r for r in rows if r["model"] == "run_div"]
    assert len(div) == 4 and all(r["status"] == "DIV" and r["mtre_mm_mean"] == "" for r in div)
    for r in rows:
        if r["model"] != "run_div":
            assert int(r["images"]) == (2 if r["split"] == "novel_view" else 4)
            assert 0.0 <= float(r["success_10mm"]) <= 1.0
    assert {"success_5mm", "success_10mm"} <= set(rows[0])
    per_image = _read_csv(out / "pose_per_image.csv")
    assert len(per_image) - 1 == (2 + 4) * 3 * 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["landmarks"] == {f"L{i + 1}": name for i, name in enumerate(NAMES)}
    assert summary["store"]["fingerprint"] == open_store(store).attrs["fingerprint"]
    assert [(r["name"], r["status"], r["evaluated"]) for r in summary["runs"]] == [
        ("run_a", "COMPLETE", True), ("run_div", "DIV", False), ("run_b", "COMPLETE", True),
    ]  # fmt: skip
    assert all(r["same_store"] for r in summary["runs"])
    assert summary["splits"]["novel_view"]["images"] == 2 and summary["splits"]["novel_subject"]["images"] == 4
    assert summary["splits"]["novel_subject"]["landmarks_invisible"] == 0
    assert summary["reference"]["available"] and summary["reference"]["train_images"] == 6
    assert summary["pose"]["thresholds_mm"] == list(SUCCESS_THRESHOLDS_MM)


def test_figures_are_pngs(results):
    import matplotlib.image

    _, out = results
    names = ["samples_novel_view.png", "samples_novel_subject.png", "per_landmark_error.png", "error_cdf.png"]
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(out.parent.glob(".results.*"))  # no staging folder left behind


def test_store_without_train_images_has_no_reference(store, runs, tmp_path):
    real = _store_with_splits(store, tmp_path / "real.zarr", {Split.TRAIN: Split.NOVEL_VIEW})
    report = evaluate_runs([runs["run_a"]], real, tmp_path / "out", EvalSettings(samples=0, **CPU))
    assert not report.reference
    assert [r.model for r in report.table1] == ["run_a", "run_a"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reference"]["available"] is False and "no train images" in summary["reference"]["reason"]
    assert summary["splits"]["novel_view"]["images"] == 8
    assert report.notes[0] == "no mean-position rows: the store has no train images"
    assert report.notes[1:] == (
        "run_a: no flip test: no landmark name ends in -l or -r, so left cannot be told from right: ['A', 'B', 'C', 'D', 'E']",
        "visibility, 'present' is: run_a: peak sigmoid >= 0.5 (no validation images: fixed)",
        "novel_subject: 1 subject, so its intervals resample images, which ignores that views of one CT are alike (too narrow)",
    )


def test_runs_of_two_sizes_get_a_reference_row_each(store, runs, tmp_path):
    # The U-Net is fully convolutional: run_a's weights also run at 48 x 48 (the store's own size).
    run_48 = tmp_path / "run_48"
    shutil.copytree(runs["run_a"], run_48)
    info = json.loads((run_48 / "run.json").read_text())
    _edit_run_json(run_48, config={**info["config"], "size": 48})
    settings = EvalSettings(splits=(Split.NOVEL_VIEW,), samples=0, **CPU)
    report = evaluate_runs([runs["run_a"], run_48], store, tmp_path / "out", settings)
    assert [r.model for r in report.table1] == ["run_a", "run_48", "mean-position@32", "mean-position@48"]
    ref32, ref48 = report.table1[2], report.table1[3]
    # The same predictor in two model sizes: its model-px errors scale by 48 / 32, its detector errors agree.
    np.testing.assert_allclose(np.asarray(ref48.rmse), 1.5 * np.asarray(ref32.rmse), rtol=1e-9)
    detector = report.tables[Unit.DETECTOR_PX]
    np.testing.assert_allclose(detector[2].rmse, detector[3].rmse, rtol=1e-9)


# ---------------------------------------------------------------- bad inputs


def _fails(run_dirs, store, out, settings=EvalSettings(**CPU)) -> PelmarkError:
    with pytest.raises(PelmarkError) as caught:
        evaluate_runs(run_dirs, store, out, settings)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))
    return caught.value


def test_run_without_checkpoint(store, runs, tmp_path):
    run = tmp_path / "no_ckpt"
    shutil.copytree(runs["run_a"], run)
    shutil.rmtree(run / "checkpoints")
    error = _fails([runs["run_a"], run], store, tmp_path / "out")
    assert run in error.path.parents and "checkpoint" in error.message


def test_run_of_another_landmark_set(store, runs, tmp_path):
    run = tmp_path / "other"
    shutil.copytree(runs["run_a"], run)
    _edit_run_json(run, landmark_names=["ASIS-l", "IOF-l", "MOF-l", "SPS", "IPS"])
    error = _fails([run], store, tmp_path / "out")
    assert error.path == run and "ASIS-l" in error.message and "landmarks" in error.message


def test_not_a_run_and_duplicate_names(store, runs, tmp_path):
    (tmp_path / "not_a_run").mkdir()
    error = _fails([tmp_path / "not_a_run"], store, tmp_path / "out")
    assert error.path == tmp_path / "not_a_run" and "run.json" in error.message
    twin = tmp_path / "twin" / "run_a"
    shutil.copytree(runs["run_a"], twin)
    error = _fails([runs["run_a"], twin], store, tmp_path / "out")
    assert "two runs are named 'run_a'" in error.message


def test_store_without_the_split(store, runs, tmp_path):
    no_subject = _store_with_splits(store, tmp_path / "ns.zarr", {Split.NOVEL_SUBJECT: Split.TRAIN})
    error = _fails([runs["run_a"]], no_subject, tmp_path / "out", EvalSettings(splits=(Split.NOVEL_SUBJECT,), **CPU))
    assert error.path == no_subject and "novel_subject" in error.message
    neither = _store_with_splits(store, tmp_path / "tr.zarr", {Split.NOVEL_SUBJECT: Split.TRAIN, Split.NOVEL_VIEW: Split.TRAIN})
    error = _fails([runs["run_a"]], neither, tmp_path / "out")
    assert error.path == neither and "--split" in error.message


def test_out_in_the_way_and_split_names(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for overwrite in (False, True):  # a folder of other files is never replaced
        with pytest.raises(PelmarkError, match="not pelmark eval results"):
            check_out(tmp_path / "full", overwrite=overwrite)
    (tmp_path / "old").mkdir()  # results of a pelmark eval from before the marker file
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"format": "pelmark-eval"}))
    with pytest.raises(PelmarkError, match="--overwrite"):
        check_out(tmp_path / "old", overwrite=False)
    check_out(tmp_path / "old", overwrite=True)
    check_out(tmp_path / "absent", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
    assert parse_splits(None) is None and parse_splits(["novel_subject", "novel_subject"]) == (Split.NOVEL_SUBJECT,)
    with pytest.raises(PelmarkError, match="unknown split 'test'"):
        parse_splits(["test"])


def test_overwrite_replaces_only_eval_results_and_never_an_input(store, runs, results, tmp_path):
    """Regression (issue 14): eval --overwrite with --out = the store (or a run folder) replaced it with results."""
    _, earlier = results
    before = {p: p.stat().st_mtime_ns for p in [*store.rglob("*"), *runs["run_a"].rglob("*")]}
    for out in (store, runs["run_a"], store / "results", runs["run_a"].parent, runs["run_a"] / "checkpoints"):
        args = ["eval", str(runs["run_a"]), "--store", str(store), "--out", str(out), "--overwrite", "--device", "cpu",
                "--workers", "0", "--no-progress"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {out}: --out must not be, hold or lie inside"), lines[0]
    assert {p: p.stat().st_mtime_ns for p in [*store.rglob("*"), *runs["run_a"].rglob("*")]} == before
    assert not (store / "results").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    error = _fails_keeping(precious, [runs["run_a"]], store, EvalSettings(overwrite=True, **CPU))
    assert error.path == precious and "not pelmark eval results" in error.message
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    # An earlier pelmark eval folder is replaced, and an empty folder is written into.
    assert (earlier / ".pelmark-eval").is_file()
    again = tmp_path / "again"
    shutil.copytree(earlier, again)
    (again / "table1.csv").write_text("stale")
    evaluate_runs([runs["run_a"]], store, again, EvalSettings(overwrite=True, samples=0, splits=(Split.NOVEL_SUBJECT,), **CPU))
    assert (again / ".pelmark-eval").is_file() and (again / "table1.csv").read_text() != "stale"
    empty = tmp_path / "empty"
    empty.mkdir()
    evaluate_runs([runs["run_a"]], store, empty, EvalSettings(samples=0, splits=(Split.NOVEL_SUBJECT,), **CPU))
    assert (empty / "table1.csv").is_file()


def _fails_keeping(out, run_dirs, store, settings) -> PelmarkError:
    with pytest.raises(PelmarkError) as caught:
        evaluate_runs(run_dirs, store, out, settings)
    assert not list(out.parent.glob(f".{out.name}.*"))
    return caught.value


# ---------------------------------------------------------------- the command line


def test_cli_eval(store, runs, tmp_path):
    out = tmp_path / "cli"
    args = ["eval", str(runs["run_a"]), str(runs["run_div"]), "--store", str(store), "--out", str(out),
            "--split", "novel_subject", "--samples", "1", "--device", "cpu", "--workers", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["split", "model", "Mean", "95%", "CI", "L1", "L2", "L3", "L4", "L5"]
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["novel_subject", "run_a"], ["novel_subject", "run_div"], ["novel_subject", "mean-position"],
    ]  # fmt: skip
    assert lines[2].split()[2] == "DIV"
    # Each printed Mean against one recomputed from per_image.csv: the mean over landmarks of
    # sqrt(mean of squared errors) over the images where the landmark was found and visible.
    squared = collections.defaultdict(list)
    for record in csv.DictReader(open(out / "per_image.csv", newline="")):
        if record["error_model_px"]:
            squared[record["model"], record["landmark"]].append(float(record["error_model_px"]) ** 2)
    for line in (lines[1], lines[3]):
        model = line.split()[1]
        rmse = [math.sqrt(np.mean(v)) for (m, _), v in squared.items() if m == model]
        assert len(rmse) == len(NAMES) and float(line.split()[2]) == pytest.approx(np.mean(rmse), abs=0.006), line
    assert _read_csv(out / "table1.csv")[1][1:3] == ["run_a", lines[1].split()[2]]
    assert not (out / "samples_novel_view.png").exists() and (out / "samples_novel_subject.png").is_file()
    assert "note: run_div: diverged (step 1: non-finite loss (nan)); shown as DIV" in lines
    # The Mean's interval beside it; novel_subject has one subject, so its intervals resample images, and say so.
    lo, hi = (float(v.strip("[],")) for v in lines[1].split()[3:5])
    assert lo <= float(lines[1].split()[2]) <= hi
    assert any(line.startswith("note: novel_subject: 1 subject, so its intervals resample images") for line in lines)


def test_cli_statistics_and_refined_rows(store, runs, tmp_path):
    out = tmp_path / "refined"
    args = ["eval", str(runs["run_a"]), str(runs["run_b"]), "--store", str(store), "--out", str(out), "--refine",
            "--bootstrap", "500", "--seed", "3", "--samples", "0", "--device", "cpu", "--workers", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    order = ["run_a", "run_a+reg", "run_b", "run_b+reg", "mean-position"]
    table = _read_csv(out / "table1.csv")
    assert [r[:2] for r in table[1:]] == [[split, m] for split in ("novel_view", "novel_subject") for m in order]
    assert [r[:2] for r in _read_csv(out / "table1_mm_isocentre.csv")[1:]] == [r[:2] for r in table[1:]]

    intervals = list(csv.DictReader(open(out / "table1_ci.csv", newline="")))
    assert list(intervals[0])[:6] == ["split", "model", "status", "Mean", "Mean_lo", "Mean_hi"]
    assert list(intervals[0])[-5:] == ["L5_lo", "L5_hi", "n_subjects", "n_images", "resampled"]
    for row, cells in zip(intervals, table[1:]):
        assert [row["split"], row["model"]] == cells[:2] and float(row["Mean"]) == pytest.approx(float(cells[2]), abs=0.005)
        for key in ("Mean", "L1", "L5"):
            assert float(row[f"{key}_lo"]) <= float(row[key]) + 1e-9 <= float(row[f"{key}_hi"]) + 2e-9
        # novel_view: 2 train subjects (1 view each), resampled as subjects; novel_subject: 1 subject, images.
        assert (row["n_subjects"], row["n_images"], row["resampled"]) == (
            ("2", "2", "subjects") if row["split"] == "novel_view" else ("1", "4", "images")
        )

    comparison = list(csv.DictReader(open(out / "comparison.csv", newline="")))
    # Every row against the first run, then each other run's refined row against its own raw row.
    assert [(r["split"], r["model"], r["baseline"]) for r in comparison] == [
        row
        for split in ("novel_view", "novel_subject")
        for row in [(split, m, "run_a") for m in order[1:]] + [(split, "run_b+reg", "run_b")]
    ]
    own = {r["split"]: r for r in comparison if r["baseline"] == "run_b"}
    versus_a = {r["split"]: r for r in comparison if r["model"] == "run_a+reg"}
    for split, row in own.items():  # run_b is a copy of run_a, so its refinement compares the same way
        assert row["difference"] == versus_a[split]["difference"] and row["p_value"] == versus_a[split]["p_value"]
    for row in comparison:
        assert float(row["lo"]) <= float(row["difference"]) <= float(row["hi"]) and 0 < float(row["p_value"]) <= 1
        if row["model"] == "run_b":  # a copy of run_a: no difference at all
            assert float(row["difference"]) == 0 and float(row["p_value"]) == 1 and row["lo"] == row["hi"] == "0.0000"
    assert "Mean RMSE against run_a" in result.stdout and "run_a+reg" in result.stdout

    robust = list(csv.DictReader(open(out / "robust.csv", newline="")))
    assert list(robust[0]) == [
        "split", "model", "status", "n_visible", "median_px", "p90_px", "within_2px", "within_5px", "within_10px",
    ]  # fmt: skip
    assert [r["model"] for r in robust] == order * 2
    for row in robust:
        assert int(row["n_visible"]) == (2 if row["split"] == "novel_view" else 4) * 5
        assert float(row["median_px"]) <= float(row["p90_px"])
        assert 0 <= float(row["within_2px"]) <= float(row["within_5px"]) <= float(row["within_10px"]) <= 1

    per_image = list(csv.DictReader(open(out / "per_image.csv", newline="")))
    flags = {r["refine_flag"] for r in per_image if r["model"].endswith("+reg")}
    assert flags <= {"", "not_found", "outlier", "failed", "outside", "not_found|outside", "outlier|outside", "unconfirmed"}
    assert all(r["refine_flag"] == "" for r in per_image if not r["model"].endswith("+reg"))
    assert {r["model"] for r in csv.DictReader(open(out / "pose.csv", newline=""))} == {"run_a", "run_b", "mean-position"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["refine"] is True and summary["statistics"]["resamples"] == 500
    assert summary["statistics"]["seed"] == 3 and summary["statistics"]["comparison"]["baseline"] == "run_a"
    assert summary["statistics"]["resampled"]["novel_subject"] == {"unit": "images", "subjects": 1, "images": 4}
    assert len(summary["statistics"]["table1_ci"]) == 10 and len(summary["statistics"]["robust_rows"]) == 10
    refined = summary["refine"]["results"]
    assert [(r["split"], r["model"]) for r in refined] == [
        (s, m) for s in ("novel_view", "novel_subject") for m in ("run_a+reg", "run_b+reg")
    ]
    assert all(r["images"] == (2 if r["split"] == "novel_view" else 4) for r in refined)
    visibility = list(csv.DictReader(open(out / "visibility.csv", newline="")))
    assert [(r["split"], r["model"]) for r in visibility] == [
        (s, m) for s in ("novel_view", "novel_subject") for m in ("run_a", "run_a+reg", "run_b", "run_b+reg")
    ]
    assert all(r["presence"].startswith("registered") == r["model"].endswith("+reg") for r in visibility)

    # The same seed gives the same numbers.
    settings = EvalSettings(samples=0, refine=True, bootstrap=500, seed=3, **CPU)
    again = evaluate_runs([runs["run_a"], runs["run_b"]], store, tmp_path / "again", settings)
    assert (tmp_path / "again" / "table1_ci.csv").read_text() == (out / "table1_ci.csv").read_text()
    assert (tmp_path / "again" / "comparison.csv").read_text() == (out / "comparison.csv").read_text()
    assert again.intervals[0]["Mean_lo"] == pytest.approx(float(intervals[0]["Mean_lo"]), abs=1e-4)


def test_cli_bad_input_is_one_line(store, runs, tmp_path):
    run = tmp_path / "other"
    shutil.copytree(runs["run_a"], run)
    _edit_run_json(run, landmark_names=["A", "B"])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(run), "--store", str(store), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}: run predicts landmarks ['A', 'B']")
    assert not out.exists()


def test_an_incomplete_store_is_refused_unless_allowed(store, runs, tmp_path):
    """Regression: on a store whose synth was interrupted, eval silently dropped the novel_subject split."""
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    open_store(partial, mode="r+")["subject_done"][2] = False  # b2, the novel subject
    out = tmp_path / "out"
    args = ["eval", str(runs["run_a"]), "--store", str(partial), "--out", str(out), "--samples", "0", "--device", "cpu",
            "--workers", "0", "--bootstrap", "10", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {partial}: store is incomplete (synth was interrupted): 1 of 3 subjects not rendered; "
        "run the same pelmark synth again to finish it, or pass --allow-incomplete to use what is there"
    ], result.output
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--allow-incomplete"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"warning: {partial}: subject 'b2' (novel_subject) was not rendered: its 4 images are missing"
    ]
    assert {row[0] for row in _read_csv(out / "table1.csv")[1:]} == {"novel_view"}


# ---------------------------------------------------------------- the flip test

SIDED = ("A-l", "B", "C", "D", "A-r")  # A-l and A-r mirror each other; B, C, D on the midline


def _sided(store: Path, run: Path, root: Path) -> tuple[Path, Path]:
    """Copies of the store and run whose landmarks are named with sides (the flip test then applies)."""
    store_copy, run_copy = root / "sided.zarr", root / "run_a"
    shutil.copytree(store, store_copy)
    open_store(store_copy, mode="r+").attrs["landmark_names"] = list(SIDED)
    shutil.copytree(run, run_copy)
    _edit_run_json(run_copy, landmark_names=list(SIDED))
    return store_copy, run_copy


def test_eval_uses_the_flip_test_where_the_landmarks_mirror(store, runs, results, tmp_path):
    from pelmark.train.checkpoint import load_run
    from pelmark.train.model import hard_argmax

    sided_store, sided_run = _sided(store, runs["run_a"], tmp_path)
    report = evaluate_runs([sided_run], sided_store, tmp_path / "flip", EvalSettings(samples=0, splits=(Split.NOVEL_VIEW,), **CPU))
    summary = json.loads((tmp_path / "flip" / "summary.json").read_text())
    assert summary["flip_test"] == {"run_a": True} and "flip test" in report.notes[0]
    # Its argmax is that of the mean of the logits of each image and of its mirror image, with
    # channels 0 and 4 (A-l, A-r) swapped in the mirror pass: recomputed here by hand.
    run = load_run(sided_run)
    truth = read_truth(sided_store, Split.NOVEL_VIEW, SIZE)
    from pelmark.train.data import DataSettings, StoreDataset

    dataset = StoreDataset(sided_store, DataSettings(size=SIZE, splits=(Split.NOVEL_VIEW,), targets=False), indices=truth.rows)
    images = torch.stack([dataset[i]["image"] for i in range(truth.n_images)])
    with torch.no_grad():
        mirrored = run.model(images.flip(-1)).flip(-1)[:, [4, 1, 2, 3, 0]]
        expected = hard_argmax(0.5 * (run.model(images) + mirrored)).numpy()
    predicted = {(int(r["row"]), r["landmark"]): (float(r["pred_x"]), float(r["pred_y"])) for r in csv.DictReader(open(tmp_path / "flip" / "per_image.csv")) if r["model"] == "run_a"}
    got = np.array([[predicted[int(row), name] for name in SIDED] for row in truth.rows])
    np.testing.assert_array_equal(got, expected)
    # --no-flip-test is the single pass: the same table as the unsided run's.
    evaluate_runs([sided_run], sided_store, tmp_path / "single", EvalSettings(samples=0, splits=(Split.NOVEL_VIEW,), flip_test=False, **CPU))
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert single["flip_test"] == {"run_a": False}
    original = [r for r in _read_csv(results[1] / "table1.csv") if r[:2] == ["novel_view", "run_a"]]
    assert [r for r in _read_csv(tmp_path / "single" / "table1.csv") if r[:2] == ["novel_view", "run_a"]] == original


def test_cli_flip_test_asked_for_landmarks_without_sides_is_one_line(store, runs, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(runs["run_a"]), "--store", str(store), "--out", str(out), "--flip-test", "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {runs['run_a']}: no flip test: no landmark name ends in -l or -r")
    assert not out.exists()

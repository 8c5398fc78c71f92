"""pelmark predict: store images written as DICOM, PNG, TIFF and NIfTI give eval's landmarks; bad files; registration."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cohort_fixtures import NAMES
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.evaluate.predict import read_truth
from pelmark.geometry import rotation_angle_deg
from pelmark.infer.predict import predict_files, read_ct_landmarks
from pelmark.infer.preprocess import ModelGrid, ReadSettings
from pelmark.store import Split, open_store
from xray_fixtures import (
    LEVELS, SIZE, expected_file_px, points, predict_cli, read_rows, store_camera, store_image, write_dicom, write_nifti,
    write_png, write_tiff,
)  # fmt: skip

# ---------------------------------------------------------------- the same landmarks as eval


def test_every_format_gives_evals_landmarks(store, run, evaluated, tmp_path):
    row = int(evaluated.truth.rows[0])
    image, camera = store_image(store, row), store_camera(store)
    files = [
        write_png(tmp_path / "drr.png", image),
        write_tiff(tmp_path / "drr.tif", image),
        write_nifti(tmp_path / "drr.nii.gz", image, camera.spacing_x_mm),
        write_dicom(tmp_path / "drr.dcm", image, camera.spacing_x_mm, camera.sdd_mm),
    ]
    out = tmp_path / "out"
    # PNG and TIFF carry no spacing: --pixel-spacing gives it (and overrides the equal DICOM and NIfTI ones).
    result = predict_cli(run, *files, "--out", out, "--pixel-spacing", camera.spacing_x_mm)
    assert result.exit_code == 0, result.output
    want = expected_file_px(evaluated, 0, camera)
    found = evaluated.found()[0]
    for stem in ("drr", "drr-2", "drr-3", "drr-4"):
        rows = read_rows(out / f"{stem}.csv")
        assert [r["landmark"] for r in rows] == list(NAMES)
        np.testing.assert_allclose(points(out / f"{stem}.csv"), want, atol=1e-9)
        np.testing.assert_allclose([float(r["peak_probability"]) for r in rows], evaluated.peak_probability[0], atol=1e-6)
        assert [r["present"] == "True" for r in rows] == found.tolist()
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "drr-4.json").read_text())
    assert document["format"] == "dicom" and document["camera"]["sdd_mm"] == camera.sdd_mm
    assert "PixelIntensityRelationship" in document["missing_tags"]
    assert [lm["x_px"] for lm in document["landmarks"]] == pytest.approx(want[:, 0].tolist(), abs=1e-9)


def test_a_2x_upsampled_image_gives_2x_the_store_pixels(store, run, evaluated, tmp_path):
    """Each store pixel as 2 x 2 pixels of 2 mm: the model input is the same, the points land at 2x + 0.5."""
    camera = store_camera(store)
    out = tmp_path / "out"
    files = []
    for i, row in enumerate(evaluated.truth.rows[:2]):
        big = np.repeat(np.repeat(store_image(store, int(row)), 2, axis=0), 2, axis=1)
        files.append(write_dicom(tmp_path / f"x{i}.dcm", big, camera.spacing_x_mm / 2, camera.sdd_mm))
    result = predict_cli(run, *files, "--out", out)
    assert result.exit_code == 0, result.output
    for i in range(2):
        store_px = expected_file_px(evaluated, i, camera)
        # Pixel centres: x_big + 0.5 = 2 (x_store + 0.5).
        np.testing.assert_allclose(points(out / f"x{i}.csv"), 2 * store_px + 0.5, atol=1e-9)
        document = json.loads((out / f"x{i}.json").read_text())
        assert document["model_input"]["height"] == SIZE and document["model_input"]["width"] == SIZE


def test_rot180_and_monochrome1(store, run, evaluated, tmp_path):
    """An image stored upside down (--rot180) and one stored bone dark (MONOCHROME1) give the same landmarks."""
    row = int(evaluated.truth.rows[0])
    image, camera = store_image(store, row), store_camera(store)
    want = expected_file_px(evaluated, 0, camera)
    turned = write_dicom(tmp_path / "turned.dcm", image[::-1, ::-1], camera.spacing_x_mm, camera.sdd_mm)
    dark = write_dicom(tmp_path / "dark.dcm", LEVELS - image, camera.spacing_x_mm, camera.sdd_mm, photometric="MONOCHROME1")
    result = predict_cli(run, turned, "--out", tmp_path / "a", "--rot180")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(points(tmp_path / "a" / "turned.csv"), [camera.width - 1, camera.height - 1] - want, atol=1e-9)
    result = predict_cli(run, dark, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(points(tmp_path / "b" / "dark.csv"), want, atol=1e-9)
    # --invert on the bone-bright DICOM gives the dark image's input, so other points.
    bright = write_dicom(tmp_path / "bright.dcm", image, camera.spacing_x_mm, camera.sdd_mm)
    assert predict_cli(run, bright, "--out", tmp_path / "c", "--invert").exit_code == 0
    assert json.loads((tmp_path / "c" / "bright.json").read_text())["sources"]["inverted"].startswith("True")


def test_intensity_images_are_log_transformed(store, run, evaluated, tmp_path):
    """A raw detector intensity exp(-k line integral) (PixelIntensityRelationship LIN) is the same image once logged."""
    row = int(evaluated.truth.rows[0])
    image, camera = store_image(store, row), store_camera(store)
    intensity = np.round(60000 * np.exp(-image / LEVELS * 3))
    path = write_dicom(tmp_path / "raw.dcm", intensity, camera.spacing_x_mm, camera.sdd_mm, PixelIntensityRelationship="LIN")
    result = predict_cli(run, path, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out" / "raw.json").read_text())
    assert document["sources"]["pixels"].startswith("intensity")
    # Quantising the intensity moves values slightly: the points agree with eval's within a model pixel.
    model_px_file = expected_file_px(evaluated, 0, camera)
    assert np.abs(points(tmp_path / "out" / "raw.csv") - model_px_file).max() <= 2.0 + 1e-9


def test_the_flip_test_gives_evals_flip_test_landmarks(store, run, evaluated, tmp_path):
    """With sided landmark names, predict averages the image and its mirror image by default, as eval does."""
    import shutil

    from pelmark.evaluate.predict import flip_choice, predict_split
    from pelmark.train.checkpoint import load_run

    sided = tmp_path / "sided"
    shutil.copytree(run, sided)
    info = json.loads((sided / "run.json").read_text())
    info["landmark_names"] = ["A-l", "B", "C", "D", "A-r"]
    (sided / "run.json").write_text(json.dumps(info))
    sided_run = load_run(sided)
    flipped = predict_split(sided_run, store, evaluated.truth, workers=0, progress=False, flip=flip_choice(sided_run, True)[0])
    assert not np.array_equal(flipped.predicted_px, evaluated.predicted_px)  # the mirror pass changes something
    row = int(evaluated.truth.rows[0])
    camera = store_camera(store)
    path = write_dicom(tmp_path / "drr.dcm", store_image(store, row), camera.spacing_x_mm, camera.sdd_mm)
    result = predict_cli(sided, path, "--out", tmp_path / "flip")
    assert result.exit_code == 0 and "(flip test)" in result.output, result.output
    np.testing.assert_allclose(points(tmp_path / "flip" / "drr.csv"), expected_file_px(flipped, 0, camera), atol=1e-9)
    assert json.loads((tmp_path / "flip" / "drr.json").read_text())["flip_test"] is True
    result = predict_cli(sided, path, "--out", tmp_path / "single", "--no-flip-test")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(points(tmp_path / "single" / "drr.csv"), expected_file_px(evaluated, 0, camera), atol=1e-9)
    assert json.loads((tmp_path / "single" / "drr.json").read_text())["flip_test"] is False
    # Unsided names: off by default, with a note; asked for, one line and nothing written.
    result = predict_cli(run, path, "--out", tmp_path / "auto")
    assert result.exit_code == 0 and "note: no flip test" in result.output, result.output
    result = predict_cli(run, path, "--out", tmp_path / "forced", "--flip-test")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "no landmark name ends in -l or -r" in result.output
    assert not (tmp_path / "forced").exists()


# ---------------------------------------------------------------- bad inputs


def test_bad_files_get_one_line_each_and_the_others_run(store, run, tmp_path):
    camera = store_camera(store)
    image = store_image(store, 0)
    good = write_dicom(tmp_path / "good.dcm", image, camera.spacing_x_mm, camera.sdd_mm)
    no_spacing = write_dicom(tmp_path / "nospacing.dcm", image, None, None)
    png = write_png(tmp_path / "plain.png", image)
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    missing = tmp_path / "missing.dcm"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(run), str(no_spacing), str(garbage), str(good), str(missing), str(png),
                                      "--out", str(out), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, result.output
    assert any(str(no_spacing) in e and "ImagerPixelSpacing, PixelSpacing" in e and "--pixel-spacing" in e for e in errors)
    assert any(str(garbage) in e and "not a readable PNG image" in e for e in errors)
    assert any(str(missing) in e and "file not found" in e for e in errors)
    assert any(str(png) in e and "--pixel-spacing" in e for e in errors)
    assert "Traceback" not in result.output
    assert "predicted 1 of 5 images" in result.output and "failed (4):" in result.output
    assert (out / "good.csv").is_file() and not (out / "garbage.csv").exists()


def test_out_and_run_are_checked_before_any_work(store, run, tmp_path):
    camera = store_camera(store)
    good = write_dicom(tmp_path / "good.dcm", store_image(store, 0), camera.spacing_x_mm, camera.sdd_mm)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    result = predict_cli(run, good, "--out", theirs)
    assert result.exit_code == 1 and "did not write" in result.output and (theirs / "notes.txt").read_text() == "mine"
    assert predict_cli(run, good, "--out", tmp_path / "a").exit_code == 0
    again = predict_cli(run, good, "--out", tmp_path / "a")
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert predict_cli(run, good, "--out", tmp_path / "a", "--overwrite").exit_code == 0
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    result = predict_cli(not_a_run, good, "--out", tmp_path / "b")
    assert result.exit_code == 1 and "run.json" in result.output and result.output.count("\n") == 1


# ---------------------------------------------------------------- registration to CT landmarks


class PerfectDetector:
    """A heatmap model whose logits peak (logit 10) at given model pixels: the registration's input is known."""

    def __init__(self, grid: ModelGrid, model_px: np.ndarray):
        self.name, self.grid, self.model_px = "perfect", grid, np.rint(model_px).astype(int)

    def outputs(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        logits = torch.full((1, len(self.model_px), height, width), -10.0)
        for i, (x, y) in enumerate(self.model_px):
            if 0 <= x < width and 0 <= y < height:
                logits[0, i, y, x] = 10.0
        return logits


def test_registration_of_true_landmarks_recovers_the_pose(cohort, store, tmp_path):
    """Detections at the true landmarks (rounded to model pixels) register to the store's pose and reproject onto them.

    The detector's grid is 4x finer than the store's (a 96² model of 1 mm pixels at the detector), so rounding
    moves a detection by at most 1/8 store pixel.
    """
    group = open_store(store)
    camera = store_camera(store)
    grid = ModelGrid(tuple(NAMES), camera, 4 * camera.width // 2, 8)
    rows = read_truth(store, Split.NOVEL_SUBJECT, grid.size)
    ct = read_ct_landmarks(cohort / "landmarks" / "b2.mrk.json", NAMES, cohort / "ct" / "b2.nii.gz")
    np.testing.assert_allclose(ct.points_world_mm, np.asarray(group["landmarks_3d"][int(rows.rows[0])]), atol=1e-3)
    checked = 0
    for i, row in enumerate(rows.rows):
        if rows.visible[i].sum() < 5:
            continue
        path = write_dicom(tmp_path / f"r{row}.dcm", store_image(store, int(row)), camera.spacing_x_mm, camera.sdd_mm)
        model = PerfectDetector(grid, rows.true_px[i])
        report = predict_files([path], model, tmp_path / "out", ReadSettings(), ct, progress=False)
        assert not report.failures
        document = json.loads((tmp_path / "out" / f"r{row}.json").read_text())
        registration = document["registration"]
        assert not registration["degenerate"] and registration["inliers"] == 5 and not registration["unconfirmed"]
        pose = torch.tensor(registration["pose"]["rotvec_rad"] + registration["pose"]["translation_mm"], dtype=torch.float64)
        true_pose = torch.from_numpy(np.asarray(group["pose"][int(row)], dtype=np.float64))
        reprojected = np.array([[lm["reprojected_x_px"], lm["reprojected_y_px"]] for lm in document["landmarks"]])
        true_store_px = np.asarray(group["landmarks_2d"][int(row)], dtype=np.float64)
        # Five beads within 10 cm pin the depth and rotation only loosely; a frame slip (LPS, a turned camera) is ~180°.
        assert float(rotation_angle_deg(pose, true_pose)) < 10.0
        # Below the half pixel that a pixel-centre or principal-point slip would add.
        assert np.abs(reprojected - true_store_px).max() < 0.4
        csv_rows = read_rows(tmp_path / "out" / f"r{row}.csv")
        assert float(csv_rows[0]["tx_mm"]) == pytest.approx(registration["pose"]["translation_mm"][0])
        assert csv_rows[0]["registration_unconfirmed"] == "False"
        # Registered presence: the reprojected landmark on the image, as the store's visibility has it.
        visible = np.asarray(group["visible"][int(row)], dtype=bool)
        assert [r["present_registered"] == "True" for r in csv_rows] == visible.tolist()
        checked += 1
    assert checked >= 1


def test_registration_needs_four_landmarks(cohort):
    with pytest.raises(PelmarkError, match="at least 4 landmarks"):
        read_ct_landmarks(cohort / "landmarks" / "b2.mrk.json", NAMES[:3])


# ---------------------------------------------------------------- a segmentation-informed model's visibility


class SegInformedStub:
    """Landmark 0 peaks on bone, landmark 1 off it (the right half is background), the others nowhere."""

    def __init__(self, grid: ModelGrid):
        self.name, self.grid = "seg-stub", grid

    def outputs(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        heatmaps = torch.full((1, len(self.grid.landmark_names), height, width), -10.0)
        heatmaps[0, 0, height // 2, width // 4] = 10.0
        heatmaps[0, 1, height // 2, 3 * width // 4] = 10.0
        segmentation = torch.zeros((1, 2, height, width))
        segmentation[0, 1, :, : width // 2] = 1.0  # bone (class 1) on the left half, background on the right
        return torch.cat([heatmaps, segmentation], dim=1)


def test_a_seg_informed_model_reports_its_visibility_and_a_peak_off_its_bone_is_absent(store, evaluated, tmp_path):
    camera = store_camera(store)
    grid = ModelGrid(tuple(NAMES), camera, SIZE, 8, segmentation_classes=("bone",))
    path = write_dicom(tmp_path / "x.dcm", store_image(store, int(evaluated.truth.rows[0])), camera.spacing_x_mm, camera.sdd_mm)
    report = predict_files([path], SegInformedStub(grid), tmp_path / "out", ReadSettings(), progress=False)
    assert not report.failures
    rows = read_rows(tmp_path / "out" / "x.csv")
    # v̂: 1 found on bone, 0.5 found off it, 0 not found (the names have no known bone: any bone class counts).
    assert [float(r["visibility"]) for r in rows] == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert [r["present"] == "True" for r in rows] == [True, False, False, False, False]
    # A heatmap model's rows have no visibility column.
    plain = PerfectDetector(ModelGrid(tuple(NAMES), camera, SIZE, 8), np.zeros((len(NAMES), 2)))
    assert not predict_files([path], plain, tmp_path / "plain", ReadSettings(), progress=False).failures
    assert "visibility" not in read_rows(tmp_path / "plain" / "x.csv")[0]


def test_a_model_with_the_wrong_number_of_outputs_is_one_line(store, evaluated, tmp_path):
    camera = store_camera(store)
    # The grid says two bone classes (three segmentation outputs); the stub gives two.
    grid = ModelGrid(tuple(NAMES), camera, SIZE, 8, segmentation_classes=("bone", "other"))
    path = write_dicom(tmp_path / "x.dcm", store_image(store, int(evaluated.truth.rows[0])), camera.spacing_x_mm, camera.sdd_mm)
    lines = []
    report = predict_files([path], SegInformedStub(grid), tmp_path / "out", ReadSettings(), progress=False, echo=lines.append)
    assert len(report.failures) == 1 and "model gave outputs of shape" in report.failures[0][1]
    assert len(lines) == 1 and str(path) in lines[0]


def test_model_grid_reads_files_written_before_segmentation_classes(store):
    grid = ModelGrid(tuple(NAMES), store_camera(store), SIZE, 8)
    values = grid.to_dict()
    assert values["segmentation_classes"] == []
    del values["segmentation_classes"]
    assert ModelGrid.from_dict(values) == grid


@pytest.mark.slow
@pytest.mark.parametrize("margin", [0, 4])
def test_a_seg_informed_run_predicts_evals_visibility_also_through_onnx(tmp_path, margin):
    """predict's v̂ and present calls on a DICOM of a store image are eval's v̂ and votes for that image,
    from the run and from its ONNX export (whose metadata carries the bone classes); with a canvas
    margin (the export pads its input itself) too."""
    from cohort_fixtures import write_bead_store
    from pelmark.train.checkpoint import load_run
    from pelmark.train.config import Strategy, TrainConfig
    from pelmark.train.loop import train
    from pelmark.evaluate.predict import predict_split

    store = write_bead_store(tmp_path / "cohort", bones=True)
    group = open_store(store, mode="r+")
    images = np.asarray(group["images"][:], dtype=np.float64)
    group["images"][:] = np.round(images / images.max() * LEVELS).astype(np.float16)  # exact in DICOM
    config = TrainConfig(
        strategy=Strategy.SEG_INFORMED, size=SIZE, encoder="resnet18", encoder_depth=3, batch_size=2, max_steps=2,
        workers=0, device="cpu", checkpoint_every=0, canvas_margin_px=margin,
    )  # fmt: skip
    run = tmp_path / "seg"
    train(config, store, run, progress=False)
    truth = read_truth(store, Split.NOVEL_SUBJECT, SIZE)
    evaluated = predict_split(load_run(run), store, truth, workers=0, progress=False)
    camera = store_camera(store)
    path = write_dicom(tmp_path / "x.dcm", store_image(store, int(truth.rows[0])), camera.spacing_x_mm, camera.sdd_mm)
    onnx = tmp_path / "seg.onnx"
    outputs = {"run": predict_cli(run, path, "--out", tmp_path / "by-run", "--no-flip-test")}
    if importlib.util.find_spec("onnxruntime") is not None:
        assert CliRunner().invoke(app, ["export", str(run), "--onnx", str(onnx)]).exit_code == 0
        outputs["onnx"] = predict_cli("--onnx", onnx, path, "--out", tmp_path / "by-onnx", "--no-flip-test")
    for name, result in outputs.items():
        assert result.exit_code == 0, result.output
        rows = read_rows(tmp_path / f"by-{name}" / "x.csv")
        assert [float(r["visibility"]) for r in rows] == evaluated.visibility[0].tolist()
        assert [r["present"] == "True" for r in rows] == (evaluated.votes() & evaluated.inside())[0].tolist()
        np.testing.assert_allclose(points(tmp_path / f"by-{name}" / "x.csv"), expected_file_px(evaluated, 0, camera), atol=1e-9)

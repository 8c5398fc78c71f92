"""pelmark.deepfluoro: import of a layout fixture, the conversion proof, the X-ray store, bad input, PnP.

The fixture (tests/deepfluoro_fixture.py) computes its 2D gt-landmarks with the
layout document's formula, never with pelmark's converter. The expected store
pixels below are written out by hand from the document's conventions:
mirror the columns (u -> W - 1 - u, the file's camera being a mirror image of
pelmark's), turn 180° about the principal point where rot-180-for-up
(u -> 2 cx - u, v -> 2 cy - v), then resize edges onto edges
(x -> (x + 0.5) * size / W - 0.5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deepfluoro_fixture as fx
from pelmark import geometry
from pelmark.cli import app
from pelmark.deepfluoro.convert import LandmarkSet, camera_conversion, convert_projection, landmark_sources
from pelmark.deepfluoro.importer import PADDING_SPLIT, ImportSettings, import_deepfluoro
from pelmark.deepfluoro.layout import DeepFluoroFile
from pelmark.deepfluoro.pnp import PnPSettings, register_pnp, target_registration_errors
from pelmark.errors import PelmarkError
from pelmark.landmark_sets import DEEPFLUORO_LANDMARKS, PAPER_LANDMARKS
from pelmark.manifest import Role, load_manifest, validate_subject_data
from pelmark.store import Split, layout_of, open_store
from pelmark.synth.pipeline import run_synth
from pelmark.train.data import DataSettings, StoreDataset, camera_from_intrinsics

SIZE = 24
HOLDOUT = "18-0725"
F = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory) -> tuple[Path, tuple[fx.SpecimenTruth, ...]]:
    root = tmp_path_factory.mktemp("deepfluoro")
    path = root / "full_res.h5"
    return path, fx.write_deepfluoro_fixture(path)


@pytest.fixture(scope="module")
def imported(fixture_file, tmp_path_factory):
    """The paper's 8 landmarks, 18-0725 held out, 24 x 24 store images."""
    path, _ = fixture_file
    out = tmp_path_factory.mktemp("import") / "deepfluoro"
    summary = import_deepfluoro(path, out, ImportSettings(holdout=HOLDOUT, size=SIZE), progress=False)
    return out, summary


def _store_arrays(out: Path) -> dict[str, np.ndarray]:
    group = open_store(out / "xrays.zarr")
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}


def _expected_store_px(gt_px: np.ndarray, rot_180: bool) -> np.ndarray:
    """The document's pixels (column, row) -> store pixels, by hand (see the module docstring)."""
    u, v = gt_px[..., 0], gt_px[..., 1]
    cx = fx.COLS - 1 - fx.CX_PX  # principal point column after the mirror
    u = fx.COLS - 1 - u
    if rot_180:
        u, v = 2 * cx - u, 2 * fx.CY_PX - v
    return np.stack([(u + 0.5) * SIZE / fx.COLS - 0.5, (v + 0.5) * SIZE / fx.ROWS - 0.5], axis=-1)


def _world(truth: fx.SpecimenTruth, name: str) -> np.ndarray:
    """pelmark world of a landmark by hand: RAS about the CT centre, F (p - c) in LPS terms."""
    points = np.stack([truth.landmarks_lps[s] for s in landmark_sources(name)]).mean(0)
    return F @ (points - truth.center_lps)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- the import and its proof


def test_import_writes_a_complete_folder(imported):
    out, summary = imported
    assert sorted(p.name for p in out.iterdir()) == ["ct", "import_report.json", "landmarks", "manifest.toml", "seg", "xrays.zarr"]
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["17-1882.nii.gz", "18-0725.nii.gz"]
    assert _leftovers(out.parent) == []
    assert len(summary.checks) == 5 and [s.projections for s in summary.specimens] == [3, 2]
    report = json.loads((out / "import_report.json").read_text())
    assert report["conversion_check"]["max_px"] == pytest.approx(summary.max_error_px)
    assert len(report["conversion_check"]["projections"]) == 5
    assert report["mirror_columns"] is True
    # The fixture is a PA view (source posterior): ~180° from pelmark's nominal AP.
    assert report["rotation_from_nominal_ap_deg"]["min"] > 150.0
    # ...so the manifest asks synth for DRRs around the PA view, like the real X-rays.
    assert load_manifest(summary.manifest).synth["view"] == "pa"
    assert "conversion check" in summary.lines()[1]


def test_segmentations_are_imported_on_the_ct_grid_and_turned_with_their_images(imported):
    """vol-seg becomes each subject's label volume; gt-seg (the fixture marks the bright marker) turns like the image."""
    from pelmark.io.labels import load_labels
    from pelmark.io.ct import load_ct
    from pelmark.manifest import load_manifest, validate_subject_data

    out, _ = imported
    manifest = load_manifest(out / "manifest.toml")
    assert manifest.classes == ("hemipelvis-l",)  # DeepFluoro's "left-hemipelvis"
    for subject in manifest.subjects:
        validate_subject_data(manifest, subject)  # on the CT's grid, values within the classes
        labels = load_labels(subject.segmentation).labels
        ct = load_ct(subject.ct)
        np.testing.assert_array_equal(labels, (ct.hu > 0).astype(np.uint8))  # the fixture's vol-seg is hu > 0
    group = open_store(out / "xrays.zarr")
    assert dict(group.attrs)["classes"] == ["hemipelvis-l"]
    rows = np.flatnonzero(np.asarray(group["split"][:]) != 255)
    for row in rows:
        image = np.asarray(group["images"][row], dtype=np.float32)
        seg = np.asarray(group["segmentation"][row])
        assert seg.shape == (SIZE, SIZE) and seg.any()
        brightest = np.unravel_index(np.argmax(image), image.shape)
        assert seg[brightest] == 1, f"row {row}: the marker's label is not where the image's marker is"


def test_conversion_proof_is_below_tolerance(imported):
    _, summary = imported
    # Exact conversion: float64 round-off only, far below the 0.5 px acceptance.
    assert summary.max_error_px < 1e-9
    assert {c.rot_180_for_up for c in summary.checks} == {True, False}


def test_store_pixels_match_the_document_by_hand(imported, fixture_file):
    out, _ = imported
    _, truths = fixture_file
    arrays = _store_arrays(out)
    group = open_store(out / "xrays.zarr")
    camera = geometry.Camera.from_dict(dict(group.attrs["intrinsics"]))
    views = layout_of(group).views
    direct = [i for i, n in enumerate(PAPER_LANDMARKS) if len(landmark_sources(n)) == 1]
    for s, truth in enumerate(truths):
        for j, projection in enumerate(truth.projections):
            row = s * views + j
            expected = _expected_store_px(np.stack([projection.gt_px[PAPER_LANDMARKS[i]] for i in direct]), projection.rot_180_for_up)
            np.testing.assert_allclose(arrays["landmarks_2d"][row, direct], expected, atol=1e-4)
            # pelmark's own projection of the stored 3D landmarks with the stored pose lands there too.
            projected = geometry.project(
                torch.from_numpy(arrays["landmarks_3d"][row].astype(np.float64))[None],
                torch.from_numpy(arrays["pose"][row])[None],
                camera,
            )[0].numpy()
            np.testing.assert_allclose(projected[direct], expected, atol=1e-3)
            np.testing.assert_allclose(projected, arrays["landmarks_2d"][row], atol=1e-3)


def test_store_camera_is_the_resized_file_camera(imported):
    out, _ = imported
    intrinsics = dict(open_store(out / "xrays.zarr").attrs["intrinsics"])
    # fx = |K00| * SIZE / COLS = (1000 / 2.5) * 24 / 40 = 240 px, fy = 400 * 24 / 48 = 200 px.
    camera = geometry.Camera.from_dict(intrinsics)
    assert camera.fx == pytest.approx(240.0) and camera.fy == pytest.approx(200.0)
    assert camera.sdd_mm == pytest.approx(1000.0)
    assert (camera.height, camera.width) == (SIZE, SIZE)
    # cx: (40 - 1 - 20.8 + 0.5) * 24 / 40 - 0.5 = 10.72; cy: (21.4 + 0.5) * 0.5 - 0.5 = 10.45.
    assert camera.cx_px == pytest.approx(10.72) and camera.cy_px == pytest.approx(10.45)
    assert "pixel_convention" in intrinsics


def test_wrong_conventions_fail_the_check(fixture_file):
    path, _ = fixture_file
    with DeepFluoroFile(path) as source:
        specimen = source.specimens[0]
        conversion = camera_conversion(source.params)
        camera = conversion.camera(600.0)
        record = next(r for r in specimen.projections if r.rot_180_for_up)
        names = LandmarkSet.DEEPFLUORO14.names
        assert convert_projection(record, specimen, conversion, camera, names).max_error_px < 1e-9
        # The pose without the rot-180-for-up turn.
        assert convert_projection(record, specimen, conversion, camera, names, rot_180=False).max_error_px > 5.0
        # 3D landmarks read as RAS instead of LPS.
        as_ras = {n: F @ p for n, p in specimen.landmarks_lps.items()}
        wrong = dataclasses.replace(specimen, landmarks_lps=as_ras)
        assert convert_projection(record, wrong, conversion, camera, names).max_error_px > 5.0
        # No column mirror: S = diag(1, 1, -1) is no rotation, and no pose reproduces the file.
        unmirrored = dataclasses.replace(conversion, mirror_columns=False, axes=(1.0, 1.0, -1.0), cx_px=fx.CX_PX)
        assert convert_projection(record, specimen, unmirrored, camera, names).max_error_px > 5.0


def test_import_fails_the_check_on_a_perturbed_annotation(fixture_file, tmp_path):
    path, _ = fixture_file
    bad = tmp_path / "perturbed.h5"
    shutil.copy(path, bad)
    with h5py.File(bad, "r+") as f:
        f["17-1882/projections/001/gt-landmarks/IOF-r"][...] += np.array([0.6, 0.0])
    with pytest.raises(PelmarkError, match=r"conversion check failed.*17-1882/projections/001.*0\.600 px"):
        import_deepfluoro(bad, tmp_path / "out", ImportSettings(size=SIZE), progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # A looser tolerance accepts it.
    summary = import_deepfluoro(bad, tmp_path / "out", ImportSettings(size=SIZE, tolerance_px=0.7), progress=False)
    assert summary.max_error_px == pytest.approx(0.6, abs=1e-9)


# ---------------------------------------------------------------- manifest, store, reader


def test_manifest_loads_with_roles_and_landmarks(imported, fixture_file):
    out, _ = imported
    _, truths = fixture_file
    manifest = load_manifest(out / "manifest.toml")
    assert manifest.landmarks == PAPER_LANDMARKS
    assert [(s.id, s.role) for s in manifest.subjects] == [("17-1882", Role.TRAIN), (HOLDOUT, Role.NOVEL_SUBJECT)]
    arrays = _store_arrays(out)
    views = len(arrays["split"]) // 2
    for s, (subject, truth) in enumerate(zip(manifest.subjects, truths)):
        ct, world = validate_subject_data(manifest, subject)
        expected = np.stack([_world(truth, n) for n in PAPER_LANDMARKS])
        # NIfTI keeps the geometry in float32: micrometre round-off.
        np.testing.assert_allclose(world, expected, atol=1e-4)
        np.testing.assert_allclose(arrays["landmarks_3d"][s * views], expected, atol=1e-4)
        # CT centre in RAS by hand: F (origin + spacing * (shape - 1) / 2).
        np.testing.assert_allclose(ct.center_ras, F @ truth.center_lps, atol=1e-4)
        assert ct.shape == fx.VOLUME_SHAPE_ZYX[::-1]
    # The midline SPS is the mean of DeepFluoro's SPS-l and SPS-r.
    sps = manifest.landmarks.index("SPS")
    np.testing.assert_allclose(
        arrays["landmarks_3d"][0, sps], (_world(truths[0], "SPS-l") + _world(truths[0], "SPS-r")) / 2, atol=1e-4
    )


def test_store_layout_splits_and_padding(imported):
    out, _ = imported
    group = open_store(out / "xrays.zarr")
    attrs = dict(group.attrs)
    for key in ("landmark_names", "subjects", "splits", "intrinsics", "pose_convention", "world_frame",
                "image_normalisation", "seed", "manifest_sha256", "settings", "fingerprint", "versions", "created"):  # fmt: skip
        assert key in attrs, key
    assert attrs["complete"] is True and attrs["padding_split"] == PADDING_SPLIT
    layout = layout_of(group)
    assert (layout.n_subjects, layout.views, layout.height, layout.width) == (2, 3, SIZE, SIZE)
    arrays = _store_arrays(out)
    assert arrays["images"].shape == (6, SIZE, SIZE) and arrays["images"].dtype == np.float16
    # 17-1882: 3 train rows; 18-0725 (held out): 2 novel_subject rows and one padding row.
    assert arrays["split"].tolist() == [Split.TRAIN] * 3 + [Split.NOVEL_SUBJECT] * 2 + [PADDING_SPLIT]
    assert arrays["subject"].tolist() == [0, 0, 0, 1, 1, 1]
    assert arrays["subject_done"].tolist() == [True, True]
    assert not arrays["visible"][5].any() and not arrays["images"][5].any()
    assert arrays["visible"][:5].sum() > 20
    assert [s["rows"] for s in attrs["subjects"]] == [[0, 3], [3, 5]]
    assert [s["role"] for s in attrs["subjects"]] == ["train", "novel_subject"]


def test_store_dataset_reads_the_real_store(imported):
    out, _ = imported
    store = out / "xrays.zarr"
    train = StoreDataset(store, DataSettings(size=16))
    novel = StoreDataset(store, DataSettings(size=16, splits=(Split.NOVEL_SUBJECT,)))
    assert train.rows.tolist() == [0, 1, 2] and novel.rows.tolist() == [3, 4]
    with pytest.raises(PelmarkError, match="no novel_view images"):
        StoreDataset(store, DataSettings(size=16, splits=(Split.NOVEL_VIEW,)))
    arrays = _store_arrays(out)
    for dataset in (train, novel):
        for i in range(len(dataset)):
            sample = dataset[i]
            row = sample["index"]
            # Landmarks follow the resize 24 -> 16 exactly: x' = (x + 0.5) * 16 / 24 - 0.5.
            expected = (arrays["landmarks_2d"][row].astype(np.float64) + 0.5) * 16 / SIZE - 0.5
            np.testing.assert_allclose(sample["landmarks_px"].numpy(), expected, atol=1e-4)
            camera = camera_from_intrinsics(sample["intrinsics"])
            projected = geometry.project(sample["landmarks_3d"].double()[None], sample["pose"][None], camera)[0]
            np.testing.assert_allclose(projected.numpy(), expected, atol=1e-3)


def test_images_turn_with_their_landmarks(imported, fixture_file):
    """The fixture's dark spot at a marker landmark becomes the bright maximum of the stored line integral there."""
    out, _ = imported
    _, truths = fixture_file
    arrays = _store_arrays(out)
    views = len(arrays["split"]) // 2
    for s, truth in enumerate(truths):
        for j, projection in enumerate(truth.projections):
            marker = PAPER_LANDMARKS.index(projection.marker)
            image = arrays["images"][s * views + j].astype(np.float64)
            peak = np.array(np.unravel_index(np.argmax(image), image.shape)[::-1], dtype=np.float64)
            expected = arrays["landmarks_2d"][s * views + j, marker]
            assert np.linalg.norm(peak - expected) <= 1.0, (truth.name, projection.key)
            # Without the mirror (and turn) the spot would sit elsewhere.
            raw = (projection.gt_px[projection.marker] + 0.5) * np.array([SIZE / fx.COLS, SIZE / fx.ROWS]) - 0.5
            assert np.linalg.norm(peak - raw) > 3.0


def test_fourteen_landmarks(fixture_file, tmp_path):
    path, truths = fixture_file
    out = tmp_path / "df14"
    import_deepfluoro(path, out, ImportSettings(landmarks=LandmarkSet.DEEPFLUORO14, size=SIZE), progress=False)
    manifest = load_manifest(out / "manifest.toml")
    assert manifest.landmarks == DEEPFLUORO_LANDMARKS
    assert all(s.role is Role.TRAIN for s in manifest.subjects)
    arrays = _store_arrays(out)
    assert set(arrays["split"][:5].tolist()) == {Split.TRAIN}
    projection = truths[1].projections[0]
    expected = _expected_store_px(np.stack([projection.gt_px[n] for n in DEEPFLUORO_LANDMARKS]), projection.rot_180_for_up)
    np.testing.assert_allclose(arrays["landmarks_2d"][3], expected, atol=1e-4)
    np.testing.assert_allclose(arrays["landmarks_3d"][3], np.stack([_world(truths[1], n) for n in DEEPFLUORO_LANDMARKS]), atol=1e-4)


def test_synth_runs_on_the_imported_cts(imported, tmp_path):
    out, _ = imported
    report = run_synth(
        out / "manifest.toml",
        tmp_path / "drr.zarr",
        {"views": 2, "novel_views": 0, "height": 16, "pixel_spacing": 6.0, "scheduler": "sync", "n_points": 32},
        progress=False,
    )
    assert report.n_images == 4
    attrs = dict(open_store(tmp_path / "drr.zarr").attrs)
    assert attrs["settings"]["sdd"] == pytest.approx(1000.0)  # the real C-arm's, from the manifest's [synth]


# ---------------------------------------------------------------- bad input


def _drop(group_path: str):
    def edit(f):
        del f[group_path]

    return edit


def _empty(group_path: str):
    def edit(f):
        del f[group_path]
        f.create_group(group_path)

    return edit


@pytest.mark.parametrize(
    "edit, settings, message",
    [
        (_drop("proj-params"), {}, r"/proj-params: missing .*not the documented DeepFluoro"),
        (_drop("17-1882/projections/001/gt-landmarks"), {}, r"/17-1882/projections/001/gt-landmarks: missing"),
        (_empty("18-0725/projections/000/gt-landmarks"), {}, r"/18-0725/projections/000/gt-landmarks: has no landmarks"),
        (_drop("17-1882/projections/002/gt-landmarks/MOF-r"), {}, r"/17-1882/projections/002/gt-landmarks: missing MOF-r"),
        (_drop("17-1882/projections/000/gt-poses/cam-to-pelvis-vol"), {}, r"cam-to-pelvis-vol: missing"),
        (None, {"holdout": "99-9999"}, r"no specimen '99-9999' in this file \(specimens: 17-1882, 18-0725\)"),
    ],
    ids=["no-proj-params", "no-gt-landmarks", "empty-gt-landmarks", "missing-landmark", "no-pose", "bad-holdout"],
)
def test_bad_input_writes_nothing(fixture_file, tmp_path, edit, settings, message):
    path, _ = fixture_file
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    if edit is not None:
        with h5py.File(bad, "r+") as f:
            edit(f)
    with pytest.raises(PelmarkError, match=message) as info:
        import_deepfluoro(bad, tmp_path / "out", ImportSettings(size=SIZE, **settings), progress=False)
    assert info.value.path == bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def test_other_layouts_and_files_are_refused(tmp_path):
    preprocessed = tmp_path / "preprocessed.h5"
    fx.write_preprocessed_layout(preprocessed)
    with pytest.raises(PelmarkError, match=r"/proj-params: missing \(top-level keys: 01, land-names\)"):
        import_deepfluoro(preprocessed, tmp_path / "out", progress=False)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(PelmarkError, match="not a readable HDF5 file"):
        import_deepfluoro(text, tmp_path / "out", progress=False)
    with pytest.raises(PelmarkError, match="DeepFluoro file not found"):
        import_deepfluoro(tmp_path / "absent.h5", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_import_errors_and_overwrite(fixture_file, tmp_path):
    path, _ = fixture_file
    runner = CliRunner()
    out = tmp_path / "df"
    args = ["import-deepfluoro", str(path), "--out", str(out), "--size", str(SIZE), "--no-progress"]
    result = runner.invoke(app, [*args, "--holdout", "17-1882", "--landmarks", "deepfluoro14"])
    assert result.exit_code == 0, result.output
    assert "conversion check: median 0.0000 px, max 0.0000 px over 5 projections" in result.output
    assert load_manifest(out / "manifest.toml").subjects[0].role is Role.NOVEL_SUBJECT

    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {out}: output folder already exists; use --overwrite to replace it"]

    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out / "manifest.toml").landmarks == PAPER_LANDMARKS
    assert _leftovers(tmp_path) == []

    result = runner.invoke(app, [*args[:3], str(tmp_path / "other"), "--holdout", "nobody", "--no-progress"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: no specimen 'nobody'")
    assert not (tmp_path / "other").exists()

    result = runner.invoke(app, [*args[:3], str(tmp_path / "other"), "--landmarks", "twelve"])
    assert result.exit_code == 1 and "unknown --landmarks 'twelve'" in result.stderr


def test_overwrite_refuses_a_folder_that_is_not_an_import(fixture_file, tmp_path):
    path, _ = fixture_file
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("keep me")
    with pytest.raises(PelmarkError, match="not an earlier DeepFluoro import"):
        import_deepfluoro(path, tmp_path / "precious", ImportSettings(size=SIZE, overwrite=True), progress=False)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "keep me"


# ---------------------------------------------------------------- PnP + RANSAC


def test_target_registration_errors_by_hand():
    points = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    truth = torch.zeros(1, 6, dtype=torch.float64)
    shifted = torch.tensor([[0.0, 0.0, 0.0, 3.0, 4.0, 0.0]], dtype=torch.float64)
    # A pure translation moves every point by |(3, 4, 0)| = 5 mm.
    assert target_registration_errors(shifted, truth, points).item() == pytest.approx(5.0)
    # 90° about z moves (10, 0, 0) to (0, 10, 0): sqrt(200) = 14.142 mm; the origin stays: mean 7.071.
    turned = torch.tensor([[0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert target_registration_errors(turned, truth, points).item() == pytest.approx(math.sqrt(200) / 2)


def _pelvis_problem(batch: int, seed: int):
    generator = np.random.default_rng(seed)
    camera = geometry.Camera.centered(256, spacing_mm=1.164)
    points = torch.tensor(
        [[-110, 40, 60], [-60, -20, -40], [-35, -30, -25], [0, -45, -10],
         [0, -40, -45], [35, -30, -25], [60, -20, -40], [110, 40, 60]], dtype=torch.float64,
    )  # fmt: skip
    pose = torch.from_numpy(geometry.sample_poses(batch, 20.0, 20.0, generator))
    pixels = geometry.project(points.expand(batch, -1, -1), pose, camera)
    return camera, points, pose, pixels


def test_pnp_recovers_exact_poses():
    camera, points, pose, pixels = _pelvis_problem(6, 1)
    result = register_pnp(pixels, torch.ones(6, 8), points, camera, pose)
    assert result.mtre_mm.max() < 1e-4
    assert result.rotation_error_deg.max() < 1e-4 and result.translation_error_mm.max() < 1e-3
    assert bool(result.inliers.all()) and not bool(result.degenerate.any())
    summary = result.summary((2.0, 10.0))
    assert summary["success_rate_2mm"] == 1.0 and summary["success_rate_10mm"] == 1.0 and summary["n"] == 6


def test_pnp_rejects_an_outlier_under_noise():
    camera, points, pose, pixels = _pelvis_problem(6, 2)
    noisy = pixels + 0.5 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noisy[:, 3] += torch.tensor([40.0, -30.0], dtype=torch.float64)  # landmark 4 detected 50 px off
    weights = torch.ones(6, 8)
    weights[0, 6] = 0.0  # one landmark not visible in the first image
    before = pixels.clone()
    result = register_pnp(noisy, weights, points, camera, pose, PnPSettings())
    assert torch.equal(pixels, before)
    assert not bool(result.inliers[:, 3].any())
    assert not bool(result.inliers[0, 6])
    assert result.mtre_mm.max() < 3.0
    assert bool(result.success().all())
    # Plain least squares on all landmarks is pulled away by the outlier.
    from pelmark.registration import register

    plain = register(noisy, weights, points, camera).pose
    assert target_registration_errors(plain, pose, points).max() > result.mtre_mm.max()


def test_pnp_on_the_imported_store(imported):
    """The evaluation path on real-store rows: ground-truth landmarks register back to the stored poses."""
    out, _ = imported
    arrays = _store_arrays(out)
    rows = np.flatnonzero(arrays["split"] != PADDING_SPLIT)
    camera = geometry.Camera.from_dict(dict(open_store(out / "xrays.zarr").attrs["intrinsics"]))
    result = register_pnp(
        torch.from_numpy(arrays["landmarks_2d"][rows].astype(np.float64)),
        torch.from_numpy(arrays["visible"][rows].astype(np.float64)),
        torch.from_numpy(arrays["landmarks_3d"][rows].astype(np.float64)),
        camera,
        torch.from_numpy(arrays["pose"][rows]),
        PnPSettings(),
    )
    assert result.summary()["success_rate_10mm"] == 1.0
    assert result.mtre_mm.max() < 0.05

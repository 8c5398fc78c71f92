"""pelmark synth: the store's contents, determinism, scale-out, crash and resume, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cohort_fixtures import NAMES, bead_ct, centroid_errors, write_bead_cohort
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume, save_ct
from pelmark.manifest import Role
from pelmark import store as store_mod
from pelmark.synth.pipeline import run_synth

runner = CliRunner()


def _synth(manifest: Path, out: Path, **overrides):
    return run_synth(manifest, out, {"scheduler": "sync", **overrides}, progress=False)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ("images", "pose", "landmarks_2d", "visible", "landmarks_3d", "subject", "split", "subject_done")}


@pytest.fixture
def cohort(tmp_path) -> Path:
    return write_bead_cohort(tmp_path / "cohort")


def test_store_schema_and_landmarks_on_beads(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    _synth(cohort, store, views=6, height=64, pixel_spacing=3.0, novel_views=2)
    group = zarr.open_group(str(store), mode="r")
    n = 3 * 6
    assert group["images"].shape == (n, 64, 64) and group["images"].dtype == np.float16
    assert group["images"].chunks == (1, 64, 64)  # one image, one chunk
    assert group["pose"].shape == (n, 6) and group["pose"].dtype == np.float64
    assert group["landmarks_2d"].shape == (n, 5, 2) and group["landmarks_2d"].dtype == np.float32
    assert group["visible"].dtype == bool and group["landmarks_3d"].shape == (n, 5, 3)
    attrs = dict(group.attrs)
    assert attrs["landmark_names"] == list(NAMES)
    assert attrs["splits"] == {"train": 0, "novel_view": 1, "novel_subject": 2}
    assert attrs["format_version"] == store_mod.FORMAT_VERSION and attrs["complete"] is True
    assert attrs["intrinsics"]["sdd_mm"] == 1020.0 and attrs["intrinsics"]["cx_px"] == 31.5
    assert len(attrs["subjects"][0]["ct_sha256"]) == 64 and "diffdrr" in attrs["versions"]

    split = group["split"][:]
    assert (split[:6] == 1).sum() == 2 and (split[12:] == 2).all()  # 2 novel views per train CT

    # 3D landmarks are in the world frame (CT centre at the origin) of each subject.
    ct0, beads0 = bead_ct(0)
    np.testing.assert_allclose(group["landmarks_3d"][0], ct0.ras_to_world(beads0), atol=1e-4)

    errors = [
        e
        for row in range(n)
        for e in centroid_errors(group["images"][row], group["landmarks_2d"][row][group["visible"][row]])
    ]
    assert len(errors) >= 20
    assert np.median(errors) < 0.25 and max(errors) < 0.6


def test_same_seed_same_store_and_resume_skips_done(cohort, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _synth(cohort, a)
    _synth(cohort, b)
    for name, value in _arrays(a).items():
        np.testing.assert_array_equal(value, _arrays(b)[name], err_msg=name)
    report = _synth(cohort, a)
    assert report.rendered_subjects == () and len(report.skipped_subjects) == 3


def test_half_written_subject_is_redone(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    reference = _arrays(store)
    group = zarr.open_group(str(store), mode="r+")
    group["images"][4:8] = 0  # subject 1's images half-overwritten, and its flag not set: a crash
    group["subject_done"][1] = False
    report = _synth(cohort, store)
    assert report.rendered_subjects == ("b1",)
    for name, value in _arrays(store).items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


@pytest.mark.slow
def test_two_worker_local_cluster_equals_single_process(cohort, tmp_path):
    single, cluster = tmp_path / "single.zarr", tmp_path / "cluster.zarr"
    _synth(cohort, single)
    run_synth(cohort, cluster, {"scheduler": "local", "workers": 2, "threads": 1}, progress=False)
    for name, value in _arrays(single).items():
        np.testing.assert_array_equal(value, _arrays(cluster)[name], err_msg=name)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    # Enough views that a subject takes far longer to render than the 50 ms poll below: a faster
    # renderer once finished all four subjects inside a fixed sleep, and the kill landed after the run.
    manifest = write_bead_cohort(tmp_path / "cohort", n_subjects=4, synth={"views": 40, "height": 96})
    reference, store = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    _synth(manifest, reference)

    command = [sys.executable, "-m", "pelmark.cli", "synth", str(manifest), "--out", str(store), "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (store / "subject_done" / "c" / "0").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the first subject is done, the second is rendering or being written
    proc.wait()
    done = zarr.open_group(str(store), mode="r")["subject_done"][:]
    assert 0 < done.sum() < 4, "the kill should land mid-run"

    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name, value in _arrays(reference).items():
        np.testing.assert_array_equal(value, _arrays(store)[name], err_msg=name)


def test_other_settings_refused_unless_overwrite(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    with pytest.raises(PelmarkError, match="views"):
        _synth(cohort, store, views=5)
    run_synth(cohort, store, {"scheduler": "sync", "views": 5}, overwrite=True, progress=False)
    assert zarr.open_group(str(store), mode="r")["images"].shape[0] == 15


def test_store_of_another_format_version_refused(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    zarr.open_group(str(store), mode="r+").attrs["format_version"] = 99
    result = runner.invoke(app, ["synth", str(cohort), "--out", str(store), "--no-progress"])
    assert result.exit_code == 1
    assert "format version 99" in result.output and str(store) in result.output


def test_second_writer_refused_and_stale_lock_taken_over(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    lock = store_mod.StoreLock(store)
    lock.acquire()  # this (live) process holds it
    try:
        with pytest.raises(PelmarkError, match="another pelmark synth"):
            _synth(cohort, store)
    finally:
        lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    _synth(cohort, store)
    assert not lock.path.exists()


@pytest.mark.parametrize("problem", ["missing_ct", "nan_ct", "landmark_outside", "missing_name"])
def test_bad_inputs_one_line_and_nothing_written(cohort, tmp_path, problem):
    root = cohort.parent
    if problem == "missing_ct":
        (root / "ct" / "b1.nii.gz").unlink()
        culprit = "b1.nii.gz"
    elif problem == "nan_ct":
        ct, _ = bead_ct(1)
        hu = ct.hu.copy()
        hu[3, 3, 3] = np.nan
        save_ct(CTVolume(hu=hu, affine_ras=ct.affine_ras), root / "ct" / "b1.nii.gz")
        culprit = "b1.nii.gz"
    elif problem == "landmark_outside":
        text = (root / "landmarks" / "b2.mrk.json").read_text()
        data = json.loads(text)
        data["markups"][0]["controlPoints"][1]["position"] = [900.0, 900.0, 900.0]
        (root / "landmarks" / "b2.mrk.json").write_text(json.dumps(data))
        culprit = "b2.mrk.json"
    else:
        text = (root / "landmarks" / "b0.mrk.json").read_text()
        (root / "landmarks" / "b0.mrk.json").write_text(text.replace('"C"', '"Z"'))
        culprit = "b0.mrk.json"
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["synth", str(cohort), "--out", str(store), "--no-progress", "--scheduler", "sync"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0], result.output
    assert not store.exists()


def test_unwritable_output(cohort, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(PelmarkError, match="not writable"):
            _synth(cohort, locked / "s.zarr")
    finally:
        locked.chmod(0o700)


def test_cli_overrides_manifest_and_preview(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["synth", str(cohort), "--out", str(store), "--views", "3", "--novel-views", "1",
                                 "--no-progress", "--scheduler", "sync"])
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(store), mode="r")["pose"].shape == (9, 6)
    result = runner.invoke(app, ["synth", "preview", str(store), "--out", str(tmp_path / "prev")])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in (tmp_path / "prev").glob("*.png"))
    assert pngs == ["preview_novel_subject.png", "preview_novel_view.png", "preview_train.png"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_inputs_or_other_folders(cohort, tmp_path):
    """Regression (issue 14): --overwrite pointed at the cohort folder deleted its CTs, landmarks and manifest."""
    root = cohort.parent
    before = _files(root)
    for out in (root, root / "ct", root / "landmarks" / "b0.mrk.json", cohort):
        result = runner.invoke(app, ["synth", str(cohort), "--out", str(out), "--overwrite", "--no-progress"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {out}: --out must not be") and "choose another --out" in lines[0]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["synth", str(cohort), "--out", str(precious), "--no-progress", *extra])
        assert result.exit_code == 1 and result.output.strip().splitlines() == [
            f"error: {precious}: holds files that are not a pelmark synth store; "
            + ("--overwrite replaces only a store written by pelmark synth" if extra else "pick an empty or new --out")
        ]
    assert (precious / "notes.txt").read_text() == "mine" and sorted(precious.iterdir()) == [precious / "notes.txt"]
    assert _files(root) == before
    with pytest.raises(PelmarkError, match="not one"):
        store_mod.remove_store(precious)
    assert (precious / "notes.txt").is_file()


def test_an_empty_existing_folder_is_written_into(cohort, tmp_path):
    for overwrite in (False, True):
        store = tmp_path / f"empty{overwrite}.zarr"
        store.mkdir()
        run_synth(cohort, store, {"scheduler": "sync"}, overwrite=overwrite, progress=False)
        assert store_mod.open_store(store).attrs["complete"] is True


# ---------------------------------------------------------------- issue 14: refused before anything is written


def _write_ct_like(path: Path, hu: np.ndarray, spacing_mm: float, dtype: str = "float32") -> None:
    """A CT file of ``hu`` (bead CT 1's orientation and origin) with voxels of ``spacing_mm``, stored as ``dtype``."""
    import SimpleITK as sitk

    from pelmark.io.ct import ct_to_sitk

    ct, _ = bead_ct(1)
    affine = ct.affine_ras.copy()
    affine[:3, :3] *= spacing_mm / 3.0
    image = ct_to_sitk(CTVolume(hu=hu.astype(np.float32), affine_ras=affine))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16) if dtype == "int16" else image, str(path))


@pytest.mark.parametrize("problem", ["all_air", "spacing_100mm", "spacing_0.01mm"])
def test_an_implausible_ct_is_refused_by_the_input_check(cohort, tmp_path, problem):
    """Regression: an all-air int16 CT crashed in the renderer with a store half-written; 100 mm voxels rendered garbage."""
    ct, _ = bead_ct(1)
    if problem == "all_air":
        _write_ct_like(cohort.parent / "ct" / "b1.nii.gz", np.full(ct.shape, -1000.0), 3.0, dtype="int16")
        expected = "CT of subject 'b1' is all air"
    else:
        spacing = float(problem.removeprefix("spacing_").removesuffix("mm"))
        _write_ct_like(cohort.parent / "ct" / "b1.nii.gz", ct.hu, spacing)
        expected = "implausible voxel spacing"
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["synth", str(cohort), "--out", str(store), "--no-progress", "--scheduler", "sync"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {cohort.parent / 'ct' / 'b1.nii.gz'}: {expected}"), lines[0]
    assert not store.exists()


@pytest.mark.parametrize(
    ("synth", "options", "message"),
    [
        ({"views": 6.5}, [], "{manifest}: [synth] views must be an integer >= 1, got 6.5"),
        ({"views": True}, [], "{manifest}: [synth] views must be an integer >= 1, got true"),
        ({"views": "ten"}, [], '{manifest}: [synth] views must be an integer >= 1, got "ten"'),
        ({"seed": "0"}, [], '{manifest}: [synth] seed must be an integer >= 0, got "0"'),
        ({"scheduler": "nowhere"}, [], '{manifest}: [synth] scheduler must be local, sync, or a scheduler address'),
        ({}, ["--threads", "-1"], "--threads must be an integer >= 1, got -1"),
        ({}, ["--scheduler", "nowhere"], "--scheduler must be local, sync, or a scheduler address"),
    ],
)
def test_a_bad_setting_is_one_line_and_no_store(tmp_path, synth, options, message):
    """Regression: these gave tracebacks, some after creating the store (an unknown scheduler left an empty one)."""
    manifest = write_bead_cohort(tmp_path / "cohort", synth=synth)
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["synth", str(manifest), "--out", str(store), "--no-progress", *options])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: " + message.format(manifest=manifest)), lines[0]
    assert not store.exists() and not store_mod.StoreLock(store).path.exists()


def test_the_fingerprint_covers_the_landmark_points_and_roles_but_not_the_train_table(cohort, tmp_path):
    """Regression: an edited landmark file kept its stale store; a changed [train] table invalidated a finished one."""
    from pelmark.manifest import load_manifest, write_manifest

    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    manifest = load_manifest(cohort)
    write_manifest(cohort, manifest.name, manifest.landmarks, manifest.subjects, synth=manifest.synth, train={"lr": 0.5})
    report = _synth(cohort, store)
    assert report.rendered_subjects == () and len(report.skipped_subjects) == 3

    path = cohort.parent / "landmarks" / "b1.mrk.json"
    data = json.loads(path.read_text())
    data["markups"][0]["controlPoints"][0]["position"][0] += 3.0  # still inside the CT
    path.write_text(json.dumps(data))
    with pytest.raises(PelmarkError, match="other inputs \\(subject 'b1''s landmark points\\)"):
        _synth(cohort, store)
    swapped = [s if s.id != "b0" else dataclasses.replace(s, role=Role.NOVEL_SUBJECT) for s in manifest.subjects]
    write_manifest(cohort, manifest.name, manifest.landmarks, swapped, synth=manifest.synth)
    with pytest.raises(PelmarkError, match="subject 'b0''s role; subject 'b1''s landmark points"):
        _synth(cohort, store)


def test_a_store_from_before_the_landmark_fingerprint_says_so(cohort, tmp_path):
    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    group = zarr.open_group(str(store), mode="r+")
    subjects = group.attrs["subjects"]
    for record in subjects:
        del record["landmarks_sha256"]
    group.attrs["subjects"] = subjects
    group.attrs["fingerprint"] = "0" * 64
    with pytest.raises(PelmarkError, match="written by an earlier pelmark, whose fingerprint left out the landmark files"):
        _synth(cohort, store)


def test_a_subject_with_no_landmark_in_view_is_warned_about(cohort, tmp_path):
    """Regression: a CT whose landmarks never reach the detector rendered, without a word, images that teach nothing."""
    store = tmp_path / "s.zarr"
    # A detector 0.7 mm across at the isocentre, looking at the CT centre: no bead is on it.
    result = runner.invoke(app, ["synth", str(cohort), "--out", str(store), "--no-progress", "--scheduler", "sync",
                                 "--height", "8", "--pixel-spacing", "0.1", "--rotation-range", "0", "--translation-range", "0"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert [w.split(": ", 2)[1] for w in warnings] == [str(store)] * 3
    assert "subject 'b0': no landmark is on the detector in any of its 4 views" in warnings[0]
    assert not any(line.startswith("warning:") for line in runner.invoke(
        app, ["synth", str(cohort), "--out", str(tmp_path / "ok.zarr"), "--no-progress", "--scheduler", "sync"]).output.splitlines())


def test_store_format_version_of_the_wrong_type_is_named(cohort, tmp_path):
    """Regression: format_version = "1" read "store format version 1 but this pelmark reads version 1"."""
    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    zarr.open_group(str(store), mode="r+").attrs["format_version"] = "1"
    with pytest.raises(PelmarkError) as info:
        store_mod.open_store(store)
    assert str(info.value) == f'{store}: store attribute format_version is "1" (a str, not an integer): the store was edited or not written by pelmark'


def test_preview_refuses_bad_options_in_one_line(cohort, tmp_path):
    """Regression: --per-split 0 and an --out that is a file gave tracebacks."""
    store = tmp_path / "s.zarr"
    _synth(cohort, store)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    cases = [
        (["--per-split", "0", "--out", str(tmp_path / "p")], "error: --per-split must be an integer >= 1, got 0"),
        (["--out", str(afile)], f"error: {afile}: exists and is not a folder"),
        (["--out", str(store / "previews")], f"error: {store / 'previews'}: --out must not be, hold or lie inside the store"),
    ]
    for options, expected in cases:
        result = runner.invoke(app, ["synth", "preview", str(store), *options])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(expected), result.output
    assert afile.read_text() == "mine" and not (tmp_path / "p").exists() and not (store / "previews").exists()

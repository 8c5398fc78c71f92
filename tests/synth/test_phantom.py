"""The phantom pelvis cohort: exact landmarks, a real foramen, tissues, determinism, files, CLI.

Geometry checks run on the analytic anatomy (no voxels). CT checks use one
tilted subject at 2 mm (about 2 s) or small 4 mm cohorts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from typer.testing import CliRunner

from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.io.ct import load_ct
from pelmark.io.landmarks import load_landmarks
from pelmark.landmark_sets import PAPER_LANDMARKS
from pelmark.manifest import Role, load_manifest, validate_subject_data
from pelmark.seeding import numpy_generator
from pelmark.synth.phantom.anatomy import build_anatomy, lesser_trochanter
from pelmark.synth.phantom.cohort import CohortSettings, make_subject, write_cohort
from pelmark.synth.phantom.landmarks import landmark, landmarks_anatomy
from pelmark.synth.phantom.sdf import bone_sdf_on_grid
from pelmark.synth.phantom.shape import REFERENCE_SHAPE, Side, sample_shape
from pelmark.synth.phantom.voxelise import BEAD_HU, _add_beads

SMALL = CohortSettings(n_subjects=2, seed=7, spacing_mm=4.0, preview=False)


def _anatomy(seed: int):
    return build_anatomy(sample_shape(numpy_generator(seed, "phantom", "shape", 0)))


def _hu_at(subject, points_anatomy: np.ndarray) -> np.ndarray:
    """Trilinear HU of a subject's CT at anatomy-frame points."""
    inv = np.linalg.inv(subject.ct.affine_ras)
    index = subject.anatomy.to_ras(np.atleast_2d(points_anatomy)) @ inv[:3, :3].T + inv[:3, 3]
    return map_coordinates(subject.ct.hu, index.T, order=1)


def _file_digests(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tilted_subject():
    """One subject at 2 mm; seed 0's subject 0 is tilted by about 3 degrees about each axis."""
    subject = make_subject(CohortSettings(seed=0, spacing_mm=2.0), 0)
    assert min(abs(a) for a in subject.shape.tilt_deg) > 1.0
    return subject


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return write_cohort(out, SMALL)


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_asis_iof_mof_lie_exactly_on_the_bone_surface(seed):
    anatomy = _anatomy(seed)
    for side in Side:
        for kind in ("ASIS", "IOF", "MOF"):
            point = landmark(anatomy, f"{kind}-{side.value}")
            assert abs(anatomy.bone_sdf(point)[0]) < 1e-6, f"{kind}-{side.value}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_iof_and_mof_are_on_the_rim_of_an_empty_foramen(seed):
    anatomy = _anatomy(seed)
    for side in Side:
        foramen = anatomy.foramen(side)
        assert anatomy.bone_sdf(foramen.center)[0] > 5.0  # the middle of the foramen is far from bone
        for kind in ("IOF", "MOF"):
            point = landmark(anatomy, f"{kind}-{side.value}")
            inward = (foramen.center - point) / np.linalg.norm(foramen.center - point)
            assert anatomy.bone_sdf(point + inward)[0] > 0.5, "1 mm into the foramen is not bone"
            assert anatomy.bone_sdf(point - inward)[0] < -0.5, "1 mm out of the foramen is bone"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_iof_is_lowest_and_mof_most_medial_on_the_rim(seed):
    anatomy = _anatomy(seed)
    for side in Side:
        rim = anatomy.foramen(side).point(np.linspace(0.0, 2.0 * np.pi, 7200))
        iof, mof = landmark(anatomy, f"IOF-{side.value}"), landmark(anatomy, f"MOF-{side.value}")
        assert iof[2] <= rim[:, 2].min() + 1e-9
        assert abs(mof[0]) <= np.abs(rim[:, 0]).min() + 1e-9
        assert np.sign(mof[0]) == np.sign(iof[0]) == side.sign


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sps_and_ips_are_the_ends_of_the_symphysis_in_the_midline(seed):
    anatomy = _anatomy(seed)
    sym = anatomy.symphysis
    assert sym.superior[0] == sym.inferior[0] == 0.0
    assert sym.superior[2] > sym.inferior[2] + 25.0
    axis = (sym.superior - sym.inferior) / np.linalg.norm(sym.superior - sym.inferior)
    across = np.array([0.5 * sym.gap_mm + 1.0, 0.0, 0.0])
    for end, into_joint in ((sym.superior, -axis), (sym.inferior, axis)):
        # In the joint space, within 2 mm of bone; bone on both sides just inside the joint's end.
        assert 0.0 < anatomy.bone_sdf(end)[0] < 2.0
        assert np.all(anatomy.bone_sdf(np.stack([end + across + into_joint, end - across + into_joint])) < 0.0)
        # Beyond the end, along the joint, is no longer bone on either side.
        assert np.all(anatomy.bone_sdf(np.stack([end + across - 3 * into_joint, end - across - 3 * into_joint])) > 0.0)


def test_landmarks_follow_the_shape():
    reference = landmarks_anatomy(build_anatomy(REFERENCE_SHAPE))
    for seed in range(4):
        moved = landmarks_anatomy(_anatomy(seed))
        assert np.linalg.norm(moved - reference, axis=1).max() > 2.0
    asis_width = [np.ptp(landmarks_anatomy(_anatomy(s))[[0, 7], 0]) for s in range(6)]
    assert np.ptp(asis_width) > 5.0


def test_different_seeds_give_different_shapes():
    shapes = [sample_shape(numpy_generator(s, "phantom", "shape", 0)) for s in range(5)]
    assert len({s.scale for s in shapes}) == 5
    assert len({s.foramen for s in shapes}) == 5
    assert all(s.foramen[0] != s.foramen[1] for s in shapes)  # left and right differ
    assert sample_shape(numpy_generator(3, "phantom", "shape", 0)) == shapes[3]


def test_grid_evaluation_matches_point_evaluation():
    anatomy = build_anatomy(REFERENCE_SHAPE)
    bone = anatomy.bone("hip-r")
    index_to_anatomy = np.diag([-3.0, -3.0, 3.0, 1.0])
    index_to_anatomy[:3, 3] = [200.0, 100.0, -120.0]
    far = bone.far_mm(3.0)
    block, grid_sdf = bone_sdf_on_grid(bone, index_to_anatomy, (80, 80, 90), far)
    ijk = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in block], indexing="ij"), -1).reshape(-1, 3)
    points = ijk @ index_to_anatomy[:3, :3].T + index_to_anatomy[:3, 3]
    np.testing.assert_allclose(grid_sdf.reshape(-1), bone.sdf(points, far), atol=1e-4)
    assert (grid_sdf < 0).sum() > 500


# ---------------------------------------------------------------- the CT


def test_ct_orientation_and_landmark_sides(tilted_subject):
    ct = tilted_subject.ct
    spacing = 2.0
    np.testing.assert_allclose(ct.affine_ras[:3, :3], np.diag([-spacing, -spacing, spacing]))
    world = ct.ras_to_world(tilted_subject.landmarks_ras)
    assert np.all(ct.contains_world(world))
    names = list(PAPER_LANDMARKS)
    for name, point in zip(names, world):
        if name.endswith("-l"):
            assert point[0] < 0.0, name
        elif name.endswith("-r"):
            assert point[0] > 0.0, name
    # LPS index axes: the patient's left has the larger first index.
    index = ct.world_to_index(world)
    assert index[names.index("ASIS-l"), 0] > index[names.index("ASIS-r"), 0]
    assert index[names.index("SPS"), 2] > index[names.index("IPS"), 2]  # superior is +k


def test_ct_reaches_from_below_the_lesser_trochanters_to_above_l5(tilted_subject):
    ct, anatomy = tilted_subject.ct, tilted_subject.anatomy
    z_first, z_last = ct.affine_ras[2, 3], (ct.affine_ras @ [*(np.array(ct.shape) - 1.0), 1.0])[2]
    for side in Side:
        trochanter = lesser_trochanter(tilted_subject.shape, side)
        assert z_first < anatomy.to_ras(trochanter.center)[2] - trochanter.radius - 20.0
    l5_top = anatomy.to_ras(np.array(anatomy.bone("L5").bounds()))[:, 2].max()
    assert z_last > l5_top + 5.0


def test_ct_has_air_fat_soft_tissue_cancellous_and_cortical_bone(tilted_subject):
    hu = tilted_subject.ct.hu
    fractions = {
        "air": (hu < -900).mean(),
        "fat": ((hu > -140) & (hu < -60)).mean(),
        "soft tissue": ((hu > 0) & (hu < 90)).mean(),
        "cancellous": ((hu > 180) & (hu < 450)).mean(),
        "cortical": (hu > 1100).mean(),
    }
    for tissue, least in (("air", 0.05), ("fat", 0.05), ("soft tissue", 0.2), ("cancellous", 0.003), ("cortical", 0.002)):
        assert fractions[tissue] > least, f"{tissue}: {fractions[tissue]:.4f}"
    assert hu.max() < 2000.0 and hu.min() >= -1024.0
    assert np.array_equal(hu, np.rint(hu))


def test_foramen_is_a_hole_in_the_ct(tilted_subject):
    anatomy = tilted_subject.anatomy
    for side in Side:
        foramen = anatomy.foramen(side)
        assert -60.0 < _hu_at(tilted_subject, foramen.center)[0] < 140.0
        for kind in ("IOF", "MOF"):
            point = landmark(anatomy, f"{kind}-{side.value}")
            inward = (foramen.center - point) / np.linalg.norm(foramen.center - point)
            inside = _hu_at(tilted_subject, np.stack([point + d * inward for d in (3.0, 4.0, 6.0)]))
            ring = _hu_at(tilted_subject, np.stack([point - d * inward for d in (1.0, 2.0)]))
            assert np.all(inside < 150.0), f"{kind}-{side.value}: {inside}"
            assert np.all(ring > 700.0), f"{kind}-{side.value}: {ring}"


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = write_cohort(tmp_path / "a", SMALL).parent
    second = write_cohort(tmp_path / "b", SMALL).parent
    other = write_cohort(tmp_path / "c", CohortSettings(n_subjects=2, seed=8, spacing_mm=4.0, preview=False)).parent
    digests = _file_digests(first)
    assert {"manifest.toml", "phantom.json", "ct/s000.nii.gz", "landmarks/s001.mrk.json"} <= set(digests)
    assert digests == _file_digests(second)
    changed = _file_digests(other)
    assert changed["ct/s000.nii.gz"] != digests["ct/s000.nii.gz"]
    assert changed["landmarks/s000.mrk.json"] != digests["landmarks/s000.mrk.json"]


def test_a_subject_does_not_depend_on_the_cohort_size():
    alone = make_subject(CohortSettings(n_subjects=1, seed=3, spacing_mm=5.0), 0)
    among = make_subject(CohortSettings(n_subjects=9, seed=3, spacing_mm=5.0), 0)
    assert np.array_equal(alone.ct.hu, among.ct.hu)
    assert np.array_equal(alone.landmarks_ras, among.landmarks_ras)


def test_manifest_and_files_load_back_as_generated(small_cohort):
    manifest = load_manifest(small_cohort)
    assert manifest.name == "phantom"
    assert manifest.landmarks == PAPER_LANDMARKS
    assert [s.id for s in manifest.subjects] == ["s000", "s001"]
    assert [s.role for s in manifest.subjects] == [Role.TRAIN, Role.NOVEL_SUBJECT]
    assert manifest.synth == {}
    for index, entry in enumerate(manifest.subjects):
        generated = make_subject(SMALL, index)
        ct = load_ct(entry.ct)
        assert np.array_equal(ct.hu, generated.ct.hu)
        np.testing.assert_allclose(ct.affine_ras, generated.ct.affine_ras, atol=1e-9)
        points = load_landmarks(entry.landmarks, manifest.landmarks)
        np.testing.assert_allclose(points, generated.landmarks_ras, atol=1e-6)
        _, world = validate_subject_data(manifest, entry)  # every landmark inside the CT
        assert world.shape == (8, 3)


def test_beads_sit_on_the_landmarks():
    subject = make_subject(CohortSettings(n_subjects=1, seed=2, spacing_mm=4.0, beads=True), 0)
    ct = subject.ct
    index = ct.world_to_index(ct.ras_to_world(subject.landmarks_ras))
    assert np.all(map_coordinates(ct.hu, index.T, order=1) > 2200.0)
    for point in index:
        # Three voxels away along each axis there is no bead left.
        offsets = np.concatenate([np.eye(3) * 3.0, -np.eye(3) * 3.0])
        assert np.all(map_coordinates(ct.hu, (point + offsets).T, order=1) < 2000.0)


def test_bead_centroid_is_the_point():
    hu = np.zeros((20, 20, 20), dtype=np.float32)
    point = np.array([9.3, 10.55, 8.8])
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    _add_beads(hu, affine, (affine[:3, :3] @ point + affine[:3, 3])[None], radius_vox=1.5)
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), -1)
    centroid = (grid * hu[..., None]).reshape(-1, 3).sum(0) / hu.sum()
    np.testing.assert_allclose(centroid, point, atol=0.02)
    assert hu.max() == BEAD_HU


@pytest.mark.parametrize(("n", "expected"), [(1, 0), (2, 1), (5, 1), (6, 1), (8, 2), (10, 2)])
def test_default_novel_subjects(n, expected):
    assert CohortSettings(n_subjects=n).novel_count() == expected


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(PelmarkError, match="no training subject"):
        write_cohort(tmp_path, CohortSettings(n_subjects=2, n_novel_subjects=2, preview=False))
    with pytest.raises(PelmarkError, match="spacing"):
        write_cohort(tmp_path, CohortSettings(spacing_mm=0.0, preview=False))


def test_cli_writes_a_cohort(tmp_path):
    out = tmp_path / "phantom"
    result = CliRunner().invoke(app, ["phantom", str(out), "--subjects", "2", "--seed", "1", "--spacing", "4", "--no-preview"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.toml").is_file() and not (out / "preview.png").exists()
    manifest = load_manifest(out / "manifest.toml")
    assert [s.role for s in manifest.subjects] == [Role.TRAIN, Role.NOVEL_SUBJECT]
    assert all(s.ct.is_file() and s.landmarks.is_file() for s in manifest.subjects)


def test_cli_rejects_all_novel_subjects(tmp_path):
    args = ["phantom", str(tmp_path / "p"), "--subjects", "1", "--novel-subjects", "1", "--no-preview"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "no training subject" in result.output


def test_preview_draws_the_landmarks_on_the_drr(tmp_path):
    from pelmark.synth.phantom.preview import preview_camera, render_panel, write_montage

    subject = make_subject(CohortSettings(n_subjects=1, seed=5, spacing_mm=5.0), 0)
    ct = subject.ct
    camera = preview_camera(ct, pixels=48)
    panel = render_panel("s000", ct, ct.ras_to_world(subject.landmarks_ras), camera)
    assert panel.image.shape == (48, 48)
    assert np.all(camera.contains(torch.from_numpy(panel.landmarks_px)).numpy())
    # The DRR is brighter on the pubic symphysis (bone) than beside the body (air).
    sps = np.round(panel.landmarks_px[PAPER_LANDMARKS.index("SPS")]).astype(int)
    assert panel.image[sps[1], sps[0]] > panel.image[:, 0].mean()
    path = tmp_path / "preview.png"
    write_montage(path, [panel, panel], PAPER_LANDMARKS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

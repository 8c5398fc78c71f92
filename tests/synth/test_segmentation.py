"""Bone labels: projected with the image's rays, written per image into the store, deterministic, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cohort_fixtures import BONE_BLOCKS, BONE_CLASSES, bead_ct, with_bones, write_bead_cohort
from pelmark import geometry
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.io.labels import load_labels, save_labels
from pelmark.manifest import load_manifest, validate_subject_data
from pelmark.synth.pipeline import run_synth
from pelmark.synth.render import DRRRenderer, RenderSettings, label_volumes, labels_from_paths

CAMERA = Camera.centered(48, 48, sdd_mm=1020.0, spacing_mm=4.0, sid_mm=850.0)


def _shadow(ct, block, pose, grow_vox: float, reach_px: float) -> np.ndarray:
    """(48, 48) pixels within ``reach_px`` of the projection of a point of ``block`` grown by ``grow_vox`` voxels per side."""
    axes = [np.arange(lo - 0.5 - grow_vox, hi - 0.5 + grow_vox + 1e-9, 0.5) for lo, hi in block]
    points_index = np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T
    points_world = points_index @ ct.affine_world[:3, :3].T + ct.affine_world[:3, 3]
    px = geometry.project(torch.from_numpy(points_world)[None], torch.from_numpy(pose)[None], CAMERA)[0].numpy()
    rows, cols = np.mgrid[0:48, 0:48]
    hit = np.zeros((48, 48), dtype=bool)
    for x, y in px:
        hit |= (np.abs(cols - x) <= reach_px) & (np.abs(rows - y) <= reach_px)
    return hit


def test_label_paths_and_map_by_hand():
    # Class paths (C=2) of 3 pixels: 5 mm of class 1; 2 mm of 1 and 3 mm of 2; 0.4 mm of 2 (below 1 mm).
    paths = torch.tensor([[[5.0, 2.0, 0.0]], [[0.0, 3.0, 0.4]]])  # (C, H=1, W=3)
    assert labels_from_paths(paths, 1.0).tolist() == [[1, 2, 0]]
    # A tie goes to the lower class value.
    assert labels_from_paths(torch.tensor([[[2.0]], [[2.0]]]), 1.0).tolist() == [[1]]


@pytest.mark.parametrize("pose", [np.zeros(6), np.array([0.2, -0.3, 0.1, 10.0, -5.0, 8.0])])
def test_a_pixel_whose_ray_meets_one_bone_gets_that_bone(pose):
    ct, labels = with_bones(bead_ct(0)[0])
    renderer = DRRRenderer(ct, CAMERA, RenderSettings())
    paths = renderer.render_labels(pose[None], label_volumes(labels, ct, renderer.settings, renderer.block, 2))[0]
    label_map = labels_from_paths(paths, 1.0).numpy()
    # Rays within half a pixel of a point 2 voxels (6 mm) inside a block cross it for several mm;
    # rays more than a pixel from every point of the other block grown by a voxel do not meet it.
    core = [_shadow(ct, block, pose, grow_vox=-2.0, reach_px=0.5) for block in BONE_BLOCKS]
    near = [_shadow(ct, block, pose, grow_vox=1.0, reach_px=1.0) for block in BONE_BLOCKS]
    only_first = core[0] & ~near[1]
    only_second = core[1] & ~near[0]
    assert only_first.sum() > 10 and only_second.sum() > 10
    assert (label_map[only_first] == 1).all() and (label_map[only_second] == 2).all()
    assert (label_map[~near[0] & ~near[1]] == 0).all()  # rays that meet no bone
    # A path length is the bone's thickness along the ray: about 12 voxels of 3 mm at the AP view.
    if not pose.any():
        thickness = paths[0][torch.from_numpy(only_first)]
        assert torch.allclose(thickness, torch.tensor(36.0), atol=4.0)


def test_the_class_channels_integrate_like_the_image():
    """A channel of the label renderer on the attenuation volume itself gives the image, to float rounding."""
    ct, labels = with_bones(bead_ct(1)[0])
    renderer = DRRRenderer(ct, CAMERA, RenderSettings())
    pose = np.array([[0.1, 0.2, -0.1, 5.0, 0.0, -5.0]])
    image = renderer.render(pose)[0]
    density = renderer.drr.density
    both = renderer.render_labels(pose, torch.stack([density, 2.0 * density]))[0]
    torch.testing.assert_close(both[0], image, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(both[1], 2.0 * image, rtol=1e-5, atol=2e-3)


def test_a_segmentation_on_another_grid_is_refused_saying_how(tmp_path):
    manifest_path = write_bead_cohort(tmp_path / "c", n_subjects=2, bones=True)
    manifest = load_manifest(manifest_path)
    subject = manifest.subjects[0]
    volume = load_labels(subject.segmentation)
    moved = volume.affine_ras.copy()
    moved[:3, 3] += [0.0, 0.0, 3.0]
    save_labels(volume.labels, moved, subject.segmentation)
    with pytest.raises(PelmarkError, match="not on the CT's grid: origin, 3 mm"):
        validate_subject_data(manifest, subject)
    save_labels(volume.labels[:, :, :-1], volume.affine_ras, subject.segmentation)
    with pytest.raises(PelmarkError, match=r"shape 40x36x31 \(CT: 40x36x32\)"):
        validate_subject_data(manifest, subject)
    labels = volume.labels.copy()
    labels[0, 0, 0] = 3
    save_labels(labels, volume.affine_ras, subject.segmentation)
    with pytest.raises(PelmarkError, match="label 3 but"):
        validate_subject_data(manifest, subject)


def test_segmentation_needs_classes_and_classes_need_segmentations(tmp_path):
    manifest_path = write_bead_cohort(tmp_path / "c", n_subjects=2, bones=True)
    text = manifest_path.read_text()
    manifest_path.write_text(text.replace('classes = ["hemipelvis-l", "hemipelvis-r"]\n', ""))
    with pytest.raises(PelmarkError, match="has a 'segmentation' but"):
        load_manifest(manifest_path)
    manifest_path.write_text(text.replace('segmentation = "seg/b1.nii.gz"\n', ""))
    with pytest.raises(PelmarkError, match="subject 'b1' has no 'segmentation'"):
        load_manifest(manifest_path)


def test_store_labels_are_deterministic_and_survive_resume(tmp_path):
    manifest = write_bead_cohort(tmp_path / "c", bones=True)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    run_synth(manifest, a, {"scheduler": "sync"}, progress=False)
    group = zarr.open_group(str(a), mode="r")
    seg = group["segmentation"][:]
    assert seg.shape == group["images"].shape and seg.dtype == np.uint8 and group["segmentation"].chunks == (1, 48, 48)
    assert dict(group.attrs)["classes"] == list(BONE_CLASSES)
    assert set(np.unique(seg)) == {0, 1, 2}
    # Bone where the image is bright: the labelled pixels hold the larger line integrals.
    images = group["images"][:].astype(np.float32)
    assert images[seg > 0].mean() > 1.5 * images[(seg == 0) & (images > 0)].mean()

    # A second run gives the same labels; a crash in subject 1 (its labels zeroed, its flag unset) is redone.
    run_synth(manifest, b, {"scheduler": "sync"}, progress=False)
    writable = zarr.open_group(str(b), mode="r+")
    np.testing.assert_array_equal(writable["segmentation"][:], seg)
    writable["segmentation"][4:8] = 0
    writable["subject_done"][1] = False
    report = run_synth(manifest, b, {"scheduler": "sync"}, progress=False)
    assert report.rendered_subjects == ("b1",)
    np.testing.assert_array_equal(zarr.open_group(str(b), mode="r")["segmentation"][:], seg)


def test_a_store_without_labels_keeps_its_fingerprint(tmp_path):
    """Stores made before labels existed must still resume: no segmentation, no new fingerprint input."""
    from pelmark import store as store_mod

    records = [{"id": "a", "role": "train", "ct_sha256": "x", "landmarks_sha256": "y"}]
    assert store_mod.fingerprint({}, ["A"], records) == store_mod.fingerprint({}, ["A"], [{**records[0], "ct": "elsewhere"}])
    labelled = [{**records[0], "segmentation_sha256": "z"}]
    assert store_mod.fingerprint({}, ["A"], labelled) != store_mod.fingerprint({}, ["A"], records)


def test_the_phantom_labels_its_six_bones_and_projects_them_at_their_landmarks():
    """The phantom's label volume holds the six classes on bone voxels, and at the AP view the pixel of each
    hemipelvis landmark away from the midline (ASIS, IOF, MOF) projects onto that side's hemipelvis."""
    from pelmark.landmark_sets import PAPER_LANDMARKS, SEED003_CLASSES
    from pelmark.synth.phantom.cohort import CohortSettings, make_subject

    subject = make_subject(CohortSettings(n_subjects=1, seed=5, spacing_mm=5.0), 0)
    ct, labels = subject.ct, subject.labels
    assert labels.shape == ct.shape and set(np.unique(labels)) == set(range(len(SEED003_CLASSES) + 1))
    assert ct.hu[labels > 0].mean() > 300.0 and ct.hu[labels == 0].mean() < 100.0
    camera = Camera.centered(96, 96, sdd_mm=1020.0, spacing_mm=4.656, sid_mm=850.0)  # 45 cm: the whole pelvis
    renderer = DRRRenderer(ct, camera, RenderSettings())
    pose = np.zeros(6)
    paths = renderer.render_labels(pose[None], label_volumes(labels, ct, renderer.settings, renderer.block, 6))[0]
    label_map = labels_from_paths(paths, 1.0).numpy()
    points_world = torch.from_numpy(ct.ras_to_world(subject.landmarks_ras))
    px = geometry.project(points_world[None], torch.from_numpy(pose)[None], camera)[0].numpy()
    checked = 0
    for name, (x, y) in zip(PAPER_LANDMARKS, px):
        if name in ("SPS", "IPS"):
            continue
        checked += 1
        assert 1 <= x <= 94 and 1 <= y <= 94, f"{name} is off the detector"
        expected = SEED003_CLASSES.index("hemipelvis-" + name[-1]) + 1
        window = label_map[int(round(y)) - 1 : int(round(y)) + 2, int(round(x)) - 1 : int(round(x)) + 2]
        assert (window == expected).any(), f"{name}: labels {window.tolist()} around its pixel"
    assert checked == 6

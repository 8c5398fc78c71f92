"""Bone labels from one label volume (nearest class in the slice, one read a sample) against the per-class volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cohort_fixtures import bead_ct, with_bones
from pelmark import geometry
from pelmark.geometry import Camera
from pelmark.synth.render import DRRRenderer, RenderSettings, label_grid, label_volumes, labels_from_paths, ray_box_interval
from pelmark.synth.slices import SliceLabelCounter

CAMERA = Camera.centered(48, 48, sdd_mm=1020.0, spacing_mm=4.0, sid_mm=850.0)


def _count(labels: torch.Tensor, n_classes: int, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = torch.tensor(labels.shape, dtype=torch.float64)
    entry, exit_ = ray_box_interval(source, target, torch.full_like(dims, -1.0), dims)
    return SliceLabelCounter(labels, n_classes).count(source, target, entry, exit_, 1 << 20)


def test_rays_along_each_axis_count_the_voxels_of_each_class():
    # Class 1 fills i in [2, 5), class 2 i in [5, 9), on the line j = 3, k = 4; class 3 is elsewhere.
    labels = torch.zeros(12, 7, 9, dtype=torch.uint8)
    labels[2:5, 3, 4] = 1
    labels[5:9, 3, 4] = 2
    labels[0, 0, 0] = 3
    source = torch.tensor([[-20.0, 3.2, 3.9], [30.0, 2.8, 4.4]], dtype=torch.float64)  # nearest voxels: j = 3, k = 4
    target = torch.tensor([[40.0, 3.2, 3.9], [-30.0, 2.8, 4.4]], dtype=torch.float64)
    counts = _count(labels, 3, source, target)
    assert counts.tolist() == [[3, 3], [4, 4], [0, 0]]


def test_counts_that_need_two_words_stay_exact():
    """Nine classes along 300 slices need 9 bits each: five to a float64 word, so two words."""
    labels = (torch.arange(300) % 10).to(torch.uint8)[:, None, None].expand(300, 2, 2).contiguous()
    counts = _count(labels, 9, torch.tensor([[-5.0, 0.0, 1.0]], dtype=torch.float64), torch.tensor([[400.0, 0.0, 1.0]], dtype=torch.float64))
    assert counts[:, 0].tolist() == [30] * 9
    assert SliceLabelCounter(labels, 9).stack(0)[0].shape[1] == 2


def test_a_label_grid_is_the_class_of_largest_fraction_of_each_block():
    ct, labels = with_bones(bead_ct(0)[0])
    settings = RenderSettings()
    block = (2, 2, 1)
    fractions = label_volumes(labels, ct, settings, block, 2)
    grid = label_grid(labels, ct, settings, block, 2)
    best, index = fractions.max(dim=0)
    expected = torch.where((best > 0) & (best >= 1.0 - fractions.sum(dim=0)), index + 1, 0).to(torch.uint8)
    o, n = grid.offset, grid.labels.shape
    inside = expected[max(o[0], 0) : o[0] + n[0], max(o[1], 0) : o[1] + n[1], max(o[2], 0) : o[2] + n[2]]
    cut = grid.labels[max(-o[0], 0) :, max(-o[1], 0) :, max(-o[2], 0) :][: inside.shape[0], : inside.shape[1], : inside.shape[2]]
    torch.testing.assert_close(cut, inside)
    assert int((expected > 0).sum()) == int((grid.labels > 0).sum())  # no bone outside the grid's box
    assert grid.volume_shape == tuple(fractions.shape[1:])


@pytest.mark.parametrize("pose", [np.zeros(6), np.array([0.2, -0.3, 0.1, 10.0, -5.0, 8.0])])
def test_labels_after_the_image_reuse_its_rays_and_match_labels_alone(pose):
    ct, labels = with_bones(bead_ct(2)[0])
    renderer = DRRRenderer(ct, CAMERA, RenderSettings())
    grid = renderer.label_grid(labels, ct, 2)
    alone = renderer.render_labels(pose[None], grid)
    renderer.render(pose[None])
    assert renderer._last_pass is not None
    torch.testing.assert_close(renderer.render_labels(pose[None], grid), alone, rtol=0, atol=0)


def test_the_phantom_labels_agree_with_the_per_class_volumes():
    """On a phantom at the demo's 2.5 mm, under pixels about a voxel wide at the isocentre.

    Disagreements are rays within about a voxel of a bone's surface, where the per-class
    volumes (interpolated) give a ray a fraction of the bone beside it and the nearest
    class gives it all or nothing; a ray running along a surface can so have 10 mm or more
    of a bone by one and none by the other. Measured on these views: 97.9 % of the pixels
    agree; of the pixels whose longest path leads the second and the 1 mm threshold by more
    than 5 mm (two steps), all but 0.09 %; by more than 15 mm, all.
    """
    from pelmark.synth.phantom.cohort import CohortSettings, make_subject

    subject = make_subject(CohortSettings(n_subjects=1, seed=5, spacing_mm=2.5), 0)
    camera = Camera.centered(96, 96, sdd_mm=1020.0, spacing_mm=3.104, sid_mm=850.0)
    renderer = DRRRenderer(subject.ct, camera, RenderSettings())
    poses = torch.from_numpy(geometry.sample_poses(4, 45.0, 50.0, np.random.default_rng(0)))
    reference = renderer.render_labels(poses, label_volumes(subject.labels, subject.ct, renderer.settings, renderer.block, 6))
    paths = renderer.render_labels(poses, renderer.label_grid(subject.labels, subject.ct, 6))
    expected, labels = labels_from_paths(reference, 1.0), labels_from_paths(paths, 1.0)
    first, second = reference.topk(2, dim=1).values.unbind(dim=1)
    lead = torch.minimum(first - second, (first - 1.0).abs())
    agree = labels == expected
    assert float(agree.float().mean()) >= 0.975
    assert float(agree[lead > 5.0].float().mean()) >= 0.998
    assert bool(agree[lead > 15.0].all())
    # Every class's total over the image is the same to 1 %: the nearest class neither grows nor shrinks bones.
    torch.testing.assert_close(paths.sum(dim=(0, 2, 3)), reference.sum(dim=(0, 2, 3)), rtol=0.01, atol=0.0)

"""The fast rendering path: accuracy against Siddon, physics, and invariance to how it is run.

The geometry (where things land on the detector) is proven in test_render_beads.py;
these tests check the values: both trilinear samplings (slices, the default, and
uniform steps with cropping, per-ray segments and a coarse default step) and the
antialiasing block average still integrate attenuation along each ray.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from pelmark import geometry as g
from pelmark.io.ct import CTVolume
from pelmark.synth.render import (
    DRRRenderer,
    RendererKind,
    RenderSettings,
    Sampling,
    antialias_block,
    block_average,
    body_box,
    make_subject,
)

UNIFORM = RenderSettings(sampling=Sampling.UNIFORM)
NANODRR = RenderSettings(renderer=RendererKind.NANODRR)
NEEDS_NANODRR = pytest.mark.skipif(
    importlib.util.find_spec("nanodrr") is None, reason="nanodrr is not installed (pip install 'pelmark[gpu]')"
)


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _phantom() -> CTVolume:
    """A small body-like volume: an elliptic soft-tissue cylinder holding a bony ring and rod, in air.

    Anisotropic voxels and a generous air margin, so that cropping has work to do.
    """
    shape = (64, 56, 40)
    spacing = np.array([1.2, 1.2, 2.0])
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    x, y = (i - 32.0) / 22.0, (j - 26.0) / 16.0
    hu = np.full(shape, -1000.0)
    body = (x**2 + y**2 <= 1.0) & (k >= 4) & (k <= 33)
    hu[body] = 40.0
    r2 = ((i - 28.0) / 9.0) ** 2 + ((j - 24.0) / 7.0) ** 2
    hu[body & (r2 <= 1.0) & (r2 >= 0.55)] = 1100.0  # cortical ring
    hu[body & (r2 < 0.55)] = 250.0  # marrow
    hu[((i - 44.0) ** 2 + (j - 30.0) ** 2 <= 4.0) & (k >= 8) & (k <= 28)] = 1400.0  # a rod
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, 15.0, 100.0]
    return CTVolume(hu=hu.astype(np.float32), affine_ras=affine)


CAMERA = g.Camera.centered(96, sdd_mm=1020.0, spacing_mm=1.0, sid_mm=850.0)


@pytest.fixture(scope="module")
def phantom() -> CTVolume:
    return _phantom()


@pytest.fixture(scope="module")
def poses() -> torch.Tensor:
    return torch.from_numpy(g.sample_poses(3, 40.0, 15.0, np.random.default_rng(3)))


@pytest.fixture(scope="module")
def siddon_images(phantom, poses) -> torch.Tensor:
    settings = RenderSettings(renderer=RendererKind.SIDDON, crop_to_body=False)
    return DRRRenderer(phantom, CAMERA, settings).render(poses)


@pytest.mark.parametrize("settings", [RenderSettings(), UNIFORM], ids=["slices", "uniform"])
def test_trilinear_paths_match_siddon(phantom, poses, siddon_images, settings):
    renderer = DRRRenderer(phantom, CAMERA, settings)
    assert np.prod(renderer.volume_shape) < 0.6 * np.prod(phantom.shape)  # the crop did something
    images = renderer.render(poses)
    assert images.shape == (3, 96, 96) and images.dtype == torch.float32
    for image, reference in zip(images, siddon_images):
        assert _ncc(image, reference) > 0.995
        # Same units: the total attenuation seen agrees closely, not just the pattern.
        assert float(image.sum() / reference.sum()) == pytest.approx(1.0, abs=0.01)


@NEEDS_NANODRR
def test_nanodrr_matches_siddon(phantom, poses, siddon_images):
    """nanodrr on pelmark's volume, poses and detector agrees with the exact reference (issue 12: NCC >= 0.999).

    It samples the same trilinear volume as pelmark's trilinear renderer, so what is left against
    Siddon is the interpolation (the phantom's sharp bone edges), not where or how often rays are sampled.
    """
    renderer = DRRRenderer(phantom, CAMERA, NANODRR)
    images = renderer.render(poses)
    trilinear = DRRRenderer(phantom, CAMERA, RenderSettings()).render(poses)
    assert images.shape == (3, 96, 96) and images.dtype == torch.float32
    for image, reference, ours in zip(images, siddon_images, trilinear):
        assert _ncc(image, reference) >= 0.999
        assert float(image.sum() / reference.sum()) == pytest.approx(1.0, abs=2e-3)
        assert _ncc(image, ours) > 0.9999


def test_our_siddon_calls_reproduce_diffdrrs_own(phantom, poses, siddon_images):
    """Calling Siddon one ray per batch entry, in chunks, changes nothing."""
    settings = RenderSettings(renderer=RendererKind.SIDDON, crop_to_body=False)
    from diffdrr.drr import DRR

    drr = DRR(make_subject(phantom, settings), **g.diffdrr_detector_kwargs(CAMERA), renderer="siddon")
    # Pose by pose, as the renderer computes rays (a batched call rounds its float32 geometry differently).
    expected = torch.cat([drr(g.to_diffdrr(pose[None], CAMERA))[:, 0] for pose in poses])
    torch.testing.assert_close(siddon_images, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "settings", [RenderSettings(), UNIFORM, RenderSettings(renderer=RendererKind.SIDDON)], ids=["slices", "uniform", "siddon"]
)
def test_images_do_not_depend_on_chunking_or_batching(phantom, poses, settings):
    whole = DRRRenderer(phantom, CAMERA, settings).render(poses)
    # A few rays per call (about 30 trilinear segments, 6 Siddon rays), against everything in one call.
    tiny_chunks = DRRRenderer(phantom, CAMERA, dataclasses.replace(settings, chunk_samples=1000))
    chunked = tiny_chunks.render(poses)
    one_by_one = torch.stack([tiny_chunks.render(p[None])[0] for p in poses])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_cropping_to_the_body_does_not_change_the_image(phantom, poses):
    # A fine step, so that a shifted sampling grid (the crop moves each ray's entry) is not what is measured.
    fine = dataclasses.replace(UNIFORM, step_voxels=0.25)
    cropped = DRRRenderer(phantom, CAMERA, fine)
    full = DRRRenderer(phantom, CAMERA, dataclasses.replace(fine, crop_to_body=False))
    assert np.prod(cropped.volume_shape) < 0.6 * np.prod(full.volume_shape)
    a, b = cropped.render(poses), full.render(poses)
    assert float((a - b).abs().max()) < 2e-3 * float(b.max())


def test_cropping_keeps_the_slices_and_the_antialiasing_blocks(phantom, poses):
    """Slice samples sit on voxel planes, which a crop does not move, and the crop is widened to whole blocks.

    3 mm pixels are 2.5 mm at the isocentre: blocks of 2 x 2 x 1 voxels of 1.2 x 1.2 x 2 mm. The
    phantom's body starts at an odd index (4) along k, and at even ones along i and j; a crop that cut
    blocks anywhere else would average other voxels together and change the image.
    """
    camera = g.Camera.centered(40, sdd_mm=1020.0, spacing_mm=3.0, sid_mm=850.0)
    cropped = DRRRenderer(phantom, camera, RenderSettings())
    full = DRRRenderer(phantom, camera, RenderSettings(crop_to_body=False))
    assert cropped.block == full.block == (2, 2, 1)
    assert np.prod(cropped.volume_shape) < 0.6 * np.prod(full.volume_shape)
    a, b = cropped.render(poses), full.render(poses)
    torch.testing.assert_close(a, b, rtol=0.0, atol=1e-5 * float(b.max()))


def test_clipping_rays_to_the_body_keeps_rays_that_graze_a_small_object():
    """Rays are clipped by one probe ray per block of pixels; rays at a block's edge must lose nothing.

    Small pixels make the blocks large (16 x 16 here) and the 2-voxel cube projects
    to about 10 pixels, so many blocks see the cube with only some of their rays.
    Two more cubes far away stretch the crop box, so that the clipping, not the
    crop, is what keeps the rays short. (With no dilation of the occupancy, whole
    pixels of the cube go missing and this test fails.)
    """
    hu = np.full((48, 48, 48), -1000.0, dtype=np.float32)
    hu[22:24, 23:25, 24:26] = 2000.0
    hu[2:4, 2:4, 2:4] = 2000.0
    hu[44:46, 44:46, 44:46] = 2000.0
    ct = CTVolume(hu=hu, affine_ras=np.eye(4))
    camera = g.Camera.centered(64, spacing_mm=0.25)
    poses = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0, -0.5], [0.3, -0.2, 0.4, -1.0, 3.0, 1.0]], dtype=torch.float64)
    fine = dataclasses.replace(UNIFORM, step_voxels=0.05)  # so that moving each ray's first sample changes little
    clipped = DRRRenderer(ct, camera, fine).render(poses)
    whole = DRRRenderer(ct, camera, dataclasses.replace(fine, crop_to_body=False)).render(poses)
    assert float(whole.amax(dim=(1, 2)).min()) > 5.0  # the cube is in view in both poses
    torch.testing.assert_close(clipped, whole, rtol=0.0, atol=1e-3 * float(whole.max()))


def test_body_box_ignores_lone_air_noise_but_keeps_dense_voxels():
    mu = torch.zeros(40, 30, 20)
    mu[10:20, 8:15, 5:9] = 1.0
    assert body_box(mu, 0.1) == ([9, 7, 3], [21, 17, 11])  # 2-voxel blocks plus a 1-voxel margin
    mu[38, 2, 18] = 0.5  # noisy air: a lone voxel at HU -500
    assert body_box(mu, 0.1) == ([9, 7, 3], [21, 17, 11])
    mu[38, 2, 18] = 2.0  # a lone dense voxel (a marker) is anatomy, not noise
    assert body_box(mu, 0.1) == ([9, 1, 3], [40, 17, 20])
    assert body_box(torch.zeros(5, 5, 5), 0.1) == ([0, 0, 0], [1, 1, 1])


def _central_ray_ct(hu_along_y: np.ndarray, spacing_y: float) -> CTVolume:
    """A CT whose middle column along y (the AP axis) holds the given HU profile; air elsewhere.

    The shape is odd, so the middle voxel sits on the world origin and so on the
    central ray of an odd-sized detector at θ = 0, which runs along y.
    """
    shape = (9, len(hu_along_y), 9)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[2:7, :, 2:7] = hu_along_y[None, :, None]  # 5 voxels wide, so the central ray sees a flat profile
    return CTVolume(hu=hu, affine_ras=np.diag([1.5, spacing_y, 1.5, 1.0]))


def _central_pixel(ct: CTVolume, settings: RenderSettings) -> float:
    camera = g.Camera.centered(33, spacing_mm=1.0)
    image = DRRRenderer(ct, camera, settings).render(torch.zeros(1, 6, dtype=torch.float64))[0]
    return float(image[16, 16])


SETTINGS = [
    RenderSettings(),
    RenderSettings(crop_to_body=False),
    UNIFORM,
    dataclasses.replace(UNIFORM, step_voxels=1.0),
    dataclasses.replace(UNIFORM, step_voxels=0.5, crop_to_body=False),
    dataclasses.replace(UNIFORM, n_points=300),
    RenderSettings(renderer=RendererKind.SIDDON),
    pytest.param(NANODRR, marks=NEEDS_NANODRR),
]
SETTINGS_IDS = ["slices", "slices-uncropped", "uniform", "step1", "step0.5-uncropped", "n300", "siddon", "nanodrr"]


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTINGS_IDS)
def test_a_slab_integrates_to_thickness_times_attenuation(settings):
    # 24 voxels of 1.25 mm at HU 500 (mu = 1.5) between air: 30 mm x 1.5 = 45 water-equivalent mm.
    profile = np.full(61, -1000.0)
    profile[18:42] = 500.0
    value = _central_pixel(_central_ray_ct(profile, 1.25), settings)
    assert value == pytest.approx(45.0, rel=0.01)


@pytest.mark.parametrize(
    "settings",
    [
        RenderSettings(),
        dataclasses.replace(UNIFORM, step_voxels=1.0),
        RenderSettings(renderer=RendererKind.SIDDON),
        pytest.param(NANODRR, marks=NEEDS_NANODRR),
    ],
    ids=["slices", "step1", "siddon", "nanodrr"],
)
def test_a_ray_through_one_bright_voxel_integrates_to_its_length(settings):
    # One voxel of 2 mm at mu = 3 on the central ray: 6 water-equivalent mm. (The trilinear
    # hat of one voxel integrates exactly at a step of one voxel, as slices sample a ray
    # along an axis; the uniform default step of 2 can be off by up to one voxel's worth
    # for a structure this thin along the ray.)
    profile = np.full(31, -1000.0)
    profile[15] = 2000.0
    value = _central_pixel(_central_ray_ct(profile, 2.0), settings)
    assert value == pytest.approx(6.0, rel=0.01)


def test_values_do_not_depend_on_the_number_of_samples(phantom, poses):
    coarse = DRRRenderer(phantom, CAMERA, dataclasses.replace(UNIFORM, n_points=120)).render(poses[:1])
    fine = DRRRenderer(phantom, CAMERA, dataclasses.replace(UNIFORM, n_points=480)).render(poses[:1])
    assert float(coarse.sum() / fine.sum()) == pytest.approx(1.0, abs=2e-3)


def test_settings_are_checked():
    from pelmark.errors import PelmarkError

    with pytest.raises(PelmarkError, match="step_voxels"):
        RenderSettings(step_voxels=0.0)
    with pytest.raises(PelmarkError, match="max_step_mm"):
        RenderSettings(max_step_mm=-1.0)
    with pytest.raises(PelmarkError, match="n_points"):
        RenderSettings(sampling=Sampling.UNIFORM, n_points=1)
    with pytest.raises(PelmarkError, match="n_points needs sampling='uniform'"):
        RenderSettings(n_points=300)


def test_antialias_block_fits_the_detector_pixel_at_the_isocentre():
    # 128 px of 2.328 mm at SDD 1020, SID 850: 2.328 / 1.2 = 1.94 mm at the isocentre.
    demo = g.Camera.centered(128, sdd_mm=1020.0, spacing_mm=2.328, sid_mm=850.0)
    assert antialias_block(np.array([0.703, 0.703, 2.5]), demo) == (2, 2, 1)  # 1.94 / 0.703 = 2.76
    assert antialias_block(np.array([0.97, 0.5, 1.95]), demo) == (2, 3, 1)  # an exact fit counts
    paper = g.Camera.centered(768, sdd_mm=1020.0, spacing_mm=0.388, sid_mm=850.0)  # 0.32 mm at the isocentre
    assert antialias_block(np.array([0.703, 0.703, 2.5]), paper) == (1, 1, 1)


def test_block_average_keeps_each_voxel_where_it_was_and_the_total():
    mu = torch.zeros(5, 4, 3)
    mu[2, 1, 0] = 8.0  # in block (1, 0, 0) of 2 x 2 x 1 voxels, whose centre is at index (2.5, 0.5, 0)
    affine = np.array([[0.0, 2.0, 0.0, 10.0], [1.0, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    averaged, block_affine = block_average(mu, affine, (2, 2, 1))
    assert averaged.shape == (3, 2, 3)  # 5 voxels along i padded with air to 3 blocks
    assert float(averaged[1, 0, 0]) == 2.0 and float(averaged.sum()) == 2.0  # 8 spread over a block of 4
    # Block centres: the block (1, 0, 0) sits where voxel index (2.5, 0.5, 0) is.
    np.testing.assert_allclose(block_affine @ [1, 0, 0, 1], affine @ [2.5, 0.5, 0.0, 1.0])
    np.testing.assert_allclose(block_affine @ [2, 1, 2, 1], affine @ [4.5, 2.5, 2.0, 1.0])


def test_an_antialiased_slab_integrates_to_thickness_times_attenuation():
    """Averaging blocks of voxels keeps each ray's attenuation: a 30 mm slab of mu = 1.5 still gives 45 mm."""
    profile = np.full(121, -1000.0)
    profile[36:84] = 500.0  # 48 voxels of 0.625 mm
    hu = np.full((41, 121, 41), -1000.0, dtype=np.float32)
    hu[8:33, :, 8:33] = profile[None, :, None]  # wide in x and z: the central ray sees a flat slab
    ct = CTVolume(hu=hu, affine_ras=np.diag([0.625, 0.625, 0.625, 1.0]))
    camera = g.Camera.centered(33, spacing_mm=3.0)  # 2.5 mm at the isocentre: blocks of 4 voxels
    renderer = DRRRenderer(ct, camera, RenderSettings())
    assert renderer.block == (4, 4, 4)
    image = renderer.render(torch.zeros(1, 6, dtype=torch.float64))[0]
    assert float(image[16, 16]) == pytest.approx(45.0, rel=0.01)


def test_antialiasing_brings_the_image_closer_to_a_detector_that_integrates_its_pixels():
    """Bone plates 1.5 mm apart, finer than the 2 mm pixels at the isocentre, alias when rays sample them.

    The reference is a detector that integrates over each pixel: Siddon at 4 x 4 rays per pixel,
    averaged. Without antialiasing the plates' aliases make a moire pattern; with it they average out.
    """
    shape = (96, 96, 96)  # 0.5 mm voxels
    i = np.arange(shape[0])
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[16:80, 16:80, 16:80] = 0.0
    plates = (i % 3 == 0) & (i >= 16) & (i < 80)
    hu[np.ix_(plates, np.arange(16, 80), np.arange(16, 80))] = 1500.0
    ct = CTVolume(hu=hu, affine_ras=np.diag([0.5, 0.5, 0.5, 1.0]))
    camera = g.Camera.centered(24, spacing_mm=2.4)  # 2.0 mm at the isocentre: blocks of 4 voxels
    fine_camera = g.Camera.centered(96, spacing_mm=0.6)
    pose = torch.tensor([[0.0, 0.0, 0.2, 0.3, 0.0, -0.7]], dtype=torch.float64)
    reference = DRRRenderer(ct, fine_camera, RenderSettings(renderer=RendererKind.SIDDON)).render(pose)
    reference = torch.nn.functional.avg_pool2d(reference[:, None], 4)[:, 0]
    antialiased = DRRRenderer(ct, camera, RenderSettings()).render(pose)
    aliased = DRRRenderer(ct, camera, RenderSettings(antialias=False)).render(pose)
    assert DRRRenderer(ct, camera, RenderSettings()).block == (4, 4, 4)
    error = float((antialiased - reference).abs().mean())
    aliased_error = float((aliased - reference).abs().mean())
    assert error < 0.5 * aliased_error, (error, aliased_error)


def test_matter_behind_the_source_does_not_count():
    """A CT that reaches past the source (here along the AP axis, the rays' principal axis) is cut at the source.

    (DiffDRR's Siddon integrates the whole line through the volume, behind the source too: 720 mm here.)
    """
    hu = np.full((9, 241, 9), -1000.0, dtype=np.float32)  # 10 mm along y: from -1200 to +1200 mm
    hu[2:7, 110:130, 2:7] = 0.0  # 20 voxels of water around the isocentre (index 120): 200 mm
    hu[2:7, 215:, 2:7] = 1000.0  # beyond the source, which is 850 mm anterior (+y, index 205)
    ct = CTVolume(hu=hu, affine_ras=np.diag([5.0, 10.0, 5.0, 1.0]))
    camera = g.Camera.centered(9, spacing_mm=1.0)
    for settings in (RenderSettings(), UNIFORM):
        image = DRRRenderer(ct, camera, settings).render(torch.zeros(1, 6, dtype=torch.float64))[0]
        assert float(image[4, 4]) == pytest.approx(200.0, rel=0.01), settings.sampling

"""Geometry: hand-derived values, round trips, and gradcheck (kornia's pattern)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pelmark import geometry as g

F64 = torch.float64


def _camera() -> g.Camera:
    return g.Camera(
        height=96, width=80, sdd_mm=1020.0, sid_mm=700.0, spacing_x_mm=2.5, spacing_y_mm=2.2, cx_px=42.3, cy_px=45.1
    )


def _random_points(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-100, 100, size=(1, n, 3)))


def test_nominal_ap_hand_values():
    # 64 px detector, 2 mm pixels, SDD 1020, SID 850: magnification 1.2, so 10 mm at the
    # isocentre spans 12 mm = 6 px. Centre pixel coordinate (W-1)/2 = 31.5.
    cam = g.Camera.centered(64, sdd_mm=1020.0, spacing_mm=2.0, sid_mm=850.0)
    pts = torch.tensor([[[0.0, 0.0, 0.0], [-10.0, 0.0, 0.0], [0.0, 0.0, 10.0], [0.0, 100.0, 0.0]]], dtype=F64)
    px = g.project(pts, torch.zeros(1, 6, dtype=F64), cam)
    expected = torch.tensor(
        [
            [31.5, 31.5],  # isocentre on the principal point
            [37.5, 31.5],  # patient's left (RAS -x) to the right of the image
            [31.5, 25.5],  # superior (RAS +z) towards row 0
            # 100 mm anterior is 100 mm closer to the source: depth 750, still on the axis
            [31.5, 31.5],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(px[0], expected)


def test_translation_hand_value():
    # Moving the patient 50 mm towards its right (RAS +x) shifts it to image left by
    # 50 * 1.2 / 2 = 30 px.
    cam = g.Camera.centered(64, sdd_mm=1020.0, spacing_mm=2.0, sid_mm=850.0)
    pose = torch.tensor([[0.0, 0.0, 0.0, 50.0, 0.0, 0.0]], dtype=F64)
    px = g.project(torch.zeros(1, 1, 3, dtype=F64), pose, cam)
    torch.testing.assert_close(px[0, 0], torch.tensor([1.5, 31.5], dtype=F64))


def test_rotation_about_superior_axis_hand_value():
    # 90° about +z (RAS) takes a point 10 mm to the patient's right (+x) to +y (anterior),
    # i.e. onto the optical axis, 10 mm nearer the source.
    cam = g.Camera.centered(64, sdd_mm=1020.0, spacing_mm=2.0, sid_mm=850.0)
    pose = torch.tensor([[0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]], dtype=F64)
    moved = g.transform_points(pose, torch.tensor([[[10.0, 0.0, 0.0]]], dtype=F64))
    torch.testing.assert_close(moved[0, 0], torch.tensor([0.0, 10.0, 0.0], dtype=F64))
    cam_pts = g.points_to_camera(pose, torch.tensor([[[10.0, 0.0, 0.0]]], dtype=F64), cam)
    torch.testing.assert_close(cam_pts[0, 0], torch.tensor([0.0, 0.0, 840.0], dtype=F64))


def test_camera_frame_is_right_handed():
    assert torch.det(g.R_AP) == pytest.approx(1.0)


def test_rodrigues_matches_hand_values_and_small_angles():
    r = torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=F64)
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(g.rodrigues(r)[0], expected)
    tiny = torch.tensor([[1e-6, -2e-6, 3e-6]], dtype=F64)
    torch.testing.assert_close(g.rodrigues(tiny)[0], torch.eye(3, dtype=F64) + g._skew(tiny)[0], atol=1e-11, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 0.3, 2.0, math.pi - 1e-4, math.pi - 1e-7])
def test_rotvec_round_trip(angle):
    rng = np.random.default_rng(3)
    axis = rng.normal(size=(5, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    rotvec = torch.from_numpy(axis * angle)
    back = g.rotation_to_rotvec(g.rodrigues(rotvec))
    torch.testing.assert_close(g.rodrigues(back), g.rodrigues(rotvec), atol=1e-9, rtol=0)


def test_pose_matrix_round_trip():
    poses = torch.from_numpy(g.sample_poses(20, 45.0, 50.0, np.random.default_rng(0)))
    torch.testing.assert_close(g.matrix_to_pose(g.pose_to_matrix(poses)), poses, atol=1e-10, rtol=0)
    cam = _camera()
    torch.testing.assert_close(g.camera_to_pose(g.world_to_camera(poses, cam), cam), poses, atol=1e-10, rtol=0)


def test_diffdrr_round_trip_and_projection_agree():
    from diffdrr.detector import Detector

    cam = _camera()
    poses = torch.from_numpy(g.sample_poses(8, 45.0, 50.0, np.random.default_rng(1)))
    torch.testing.assert_close(g.from_diffdrr_matrix(g.to_diffdrr_matrix(poses, cam), cam), poses, atol=1e-9, rtol=0)

    # DiffDRR's own perspective projection puts pixel centres at c + 0.5.
    kwargs = g.diffdrr_detector_kwargs(cam)
    detector = Detector(
        kwargs["sdd"], kwargs["height"], kwargs["width"], kwargs["delx"], kwargs["dely"],
        kwargs["x0"], kwargs["y0"], g.diffdrr_reorient(), reverse_x_axis=True,
    )
    pts = _random_points(10, 2).expand(8, -1, -1)
    ours = g.project(pts, poses, cam)
    theirs = _diffdrr_projection(detector, g.to_diffdrr_matrix(poses, cam), pts)
    # DiffDRR keeps its intrinsics in float32 (relative error ~1e-7 on ~100 px).
    torch.testing.assert_close(ours, theirs - 0.5, atol=2e-5, rtol=0)


def _diffdrr_projection(detector, pose_matrix: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """DiffDRR 0.6.1's ``DRR.perspective_projection``, in float64, without building a DRR."""
    from diffdrr.pose import RigidTransform

    extrinsic = RigidTransform(detector.reorient.matrix.to(F64)).compose(RigidTransform(pose_matrix.to(F64)))
    x = extrinsic.inverse()(pts)
    x = torch.einsum("ij, bnj -> bni", detector.intrinsic.to(F64), x)
    x = x / x[..., -1:]
    u = detector.width - x[..., 0]
    v = detector.height - x[..., 1]
    return torch.stack([u, v], dim=-1)


def test_euler_round_trip_and_sampling_bounds():
    rng = np.random.default_rng(4)
    angles = torch.from_numpy(np.deg2rad(rng.uniform(-45, 45, size=(50, 3))))
    torch.testing.assert_close(g.rotation_to_euler(g.euler_to_rotation(angles)), angles, atol=1e-10, rtol=0)
    poses = g.sample_poses(200, 45.0, 50.0, np.random.default_rng(5))
    euler = np.rad2deg(g.rotation_to_euler(g.rodrigues(torch.from_numpy(poses[:, :3]))).numpy())
    assert np.all(np.abs(euler) <= 45.0 + 1e-9)
    assert np.all(np.abs(poses[:, 3:]) <= 50.0)
    assert np.abs(euler).max() > 40.0  # the range is actually used
    again = g.sample_poses(200, 45.0, 50.0, np.random.default_rng(5))
    np.testing.assert_array_equal(poses, again)


def test_resize_and_crop_are_exact():
    cam = _camera()
    poses = torch.from_numpy(g.sample_poses(4, 30.0, 30.0, np.random.default_rng(6)))
    pts = _random_points(7, 7).expand(4, -1, -1)
    px = g.project(pts, poses, cam)
    # Resizing: pixel edges map onto pixel edges.
    small = cam.resized(48, 40)
    expected = torch.stack([(px[..., 0] + 0.5) * 40 / 80 - 0.5, (px[..., 1] + 0.5) * 48 / 96 - 0.5], dim=-1)
    torch.testing.assert_close(g.project(pts, poses, small), expected)
    torch.testing.assert_close(cam.pixels_to(small, px), expected)
    # Cropping: a shift by the crop's corner.
    crop = cam.cropped(top=10, left=7, height=50, width=60)
    torch.testing.assert_close(g.project(pts, poses, crop), px - torch.tensor([7.0, 10.0], dtype=F64))


def test_resize_matches_interpolate_on_a_pixel():
    # A single bright pixel, downsampled 2x with area averaging, lands where resized() says.
    cam = g.Camera.centered(8)
    img = torch.zeros(1, 1, 8, 8, dtype=F64)
    img[0, 0, 2:4, 4:6] = 1.0  # a 2x2 block centred at (x=4.5, y=2.5)
    small = torch.nn.functional.interpolate(img, size=(4, 4), mode="area")
    r, c = np.unravel_index(small[0, 0].argmax().item(), (4, 4))
    mapped = cam.pixels_to(cam.resized(4, 4), torch.tensor([4.5, 2.5], dtype=F64))
    assert (c, r) == (2, 1)
    torch.testing.assert_close(mapped, torch.tensor([2.0, 1.0], dtype=F64))


@st.composite
def cameras_with_crop_and_size(draw):
    """A camera (any principal point and pixel shape), a crop window on it, and a resize target."""
    height, width = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    sdd = draw(st.floats(300.0, 2000.0))
    camera = g.Camera(
        height=height,
        width=width,
        sdd_mm=sdd,
        sid_mm=draw(st.floats(0.1, 0.99)) * sdd,
        spacing_x_mm=draw(st.floats(0.05, 5.0)),
        spacing_y_mm=draw(st.floats(0.05, 5.0)),
        cx_px=draw(st.floats(-width, 2.0 * width)),
        cy_px=draw(st.floats(-height, 2.0 * height)),
    )
    top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
    crop = (top, left, draw(st.integers(1, height - top)), draw(st.integers(1, width - left)))
    return camera, crop, (draw(st.integers(1, 600)), draw(st.integers(1, 600)))


@settings(max_examples=100, deadline=None)
@given(setup=cameras_with_crop_and_size(), fractions=st.lists(st.tuples(st.floats(-0.5, 1.5), st.floats(-0.5, 1.5)), min_size=1, max_size=8))
def test_crop_then_resize_is_the_cameras_pixel_mapping(setup, fractions):
    camera, (top, left, crop_h, crop_w), (size_h, size_w) = setup
    model = camera.cropped(top, left, crop_h, crop_w).resized(size_h, size_w)
    # Points on and around the crop window, as fractions of the full image.
    points = torch.tensor([[fx * camera.width - 0.5, fy * camera.height - 0.5] for fx, fy in fractions], dtype=F64)
    # By hand: the crop shifts by its corner, then the resize maps pixel edges onto pixel edges.
    expected = torch.stack(
        [(points[:, 0] - left + 0.5) * size_w / crop_w - 0.5, (points[:, 1] - top + 0.5) * size_h / crop_h - 0.5], dim=-1
    )
    mapped = camera.pixels_to(model, points)
    torch.testing.assert_close(mapped, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.pixels_to(camera, mapped), points, rtol=1e-9, atol=1e-9)
    # The model image shows exactly the crop window, pixel edges included.
    inside = (
        (points[:, 0] >= left - 0.5) & (points[:, 0] <= left + crop_w - 0.5)
        & (points[:, 1] >= top - 0.5) & (points[:, 1] <= top + crop_h - 0.5)
    )
    edge_distance = torch.minimum(
        torch.minimum((points[:, 0] - (left - 0.5)).abs(), (points[:, 0] - (left + crop_w - 0.5)).abs()),
        torch.minimum((points[:, 1] - (top - 0.5)).abs(), (points[:, 1] - (top + crop_h - 0.5)).abs()),
    )
    assume(bool((edge_distance > 1e-6).all()))  # on an edge, rounding decides
    assert model.contains(mapped).tolist() == inside.tolist()


def test_depth_clamp_keeps_points_behind_source_finite():
    cam = g.Camera.centered(64, sid_mm=850.0)
    pts = torch.tensor([[[0.0, 900.0, 0.0]]], dtype=F64)  # anterior of the source
    px, depth = g.project_with_depth(pts, torch.zeros(1, 6, dtype=F64), cam)
    assert depth.item() < 0
    assert torch.isfinite(px).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_project_with_rotated_is_project_with_depth_bit_for_bit(dtype):
    # The registration's solver projects through the fused form; its pixels must be project's.
    cam = _camera()
    pose = torch.from_numpy(g.sample_poses(6, 45.0, 50.0, np.random.default_rng(3)))
    pose[0, :3] = 0.0  # the Taylor branch at r = 0
    pose[1, :3] = 1e-5  # and near it
    pose[2, :3] = torch.tensor([0.0, 0.0, 3.0])  # far from it, past π
    pose[3, 4] = 900.0  # anterior, behind the source: the depth clamp
    pose, pts = pose.to(dtype), _random_points(5, 10).expand(6, -1, -1).to(dtype)
    # The unfused arithmetic, written out (project_with_depth itself now routes (B, 6) poses to the fused form).
    camera_points = g.points_to_camera(pose, pts, cam)
    depth = camera_points[..., 2]
    z = depth.clamp_min(g.DEFAULT_MIN_DEPTH_MM)
    pixels = torch.stack([cam.fx * camera_points[..., 0] / z + cam.cx_px, cam.fy * camera_points[..., 1] / z + cam.cy_px], dim=-1)
    assert (depth[3] < 0).all() and (depth[:3] > 0).all()
    fused_pixels, fused_depth, rotated = g.project_with_rotated(pts, pose, cam)
    assert torch.equal(fused_pixels, pixels)
    assert torch.equal(fused_depth, depth)
    routed_pixels, routed_depth = g.project_with_depth(pts, pose, cam)
    assert torch.equal(routed_pixels, pixels) and torch.equal(routed_depth, depth)
    # Other shapes keep the unfused path: one pose for every point set.
    single_pixels, _ = g.project_with_depth(pts[0], pose[0], cam)
    assert torch.allclose(single_pixels, pixels[0], rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-3)
    assert torch.equal(rotated + pose[:, None, 3:], g.transform_points(pose, pts))


def test_project_host_is_project_to_rounding():
    # The registration's host solver projects through the NumPy twin: the same branches
    # (Taylor at r = 0 and near it, past π, the depth clamp) and the same numbers to rounding.
    cam = _camera()
    pose = torch.from_numpy(g.sample_poses(6, 45.0, 50.0, np.random.default_rng(3)))
    pose[0, :3] = 0.0
    pose[1, :3] = 1e-5
    pose[2, :3] = torch.tensor([0.0, 0.0, 3.0])
    pose[3, 4] = 900.0  # behind the source
    pts = _random_points(5, 10).expand(6, -1, -1)
    pixels, depth, rotated = g.project_with_rotated(pts, pose, cam)
    host_pixels, host_depth, host_rotated = g.project_host(pts.numpy(), pose.numpy(), cam)
    torch.testing.assert_close(torch.from_numpy(host_pixels), pixels, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(host_depth), depth, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(host_rotated), rotated, rtol=1e-13, atol=1e-10)
    assert (host_depth[3] < 0).all()


def test_projection_gradcheck():
    cam = _camera()
    pose = torch.from_numpy(g.sample_poses(2, 40.0, 40.0, np.random.default_rng(8))).requires_grad_(True)
    pts = _random_points(5, 9).expand(2, -1, -1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, x: g.project(x, p, cam), (pose, pts))
    zero = torch.zeros(1, 6, dtype=F64, requires_grad=True)  # the Rodrigues singularity at r = 0
    assert torch.autograd.gradcheck(lambda p: g.project(pts[:1].detach(), p, cam), (zero,))


def test_rotation_angle_deg():
    a = torch.zeros(1, 6, dtype=F64)
    b = torch.tensor([[0.0, 0.0, math.radians(30.0), 5.0, 0.0, 0.0]], dtype=F64)
    assert g.rotation_angle_deg(a, b).item() == pytest.approx(30.0)
    assert g.rotation_angle_deg(b, b).item() == pytest.approx(0.0, abs=1e-6)


def test_pa_view_poses_turn_the_patient_about_the_superior_axis():
    """With no random part, a PA pose is 180° about z: the patient's right goes to the image's right side."""
    ap = g.sample_poses(3, 0.0, 0.0, np.random.default_rng(0))
    pa = g.sample_poses(3, 0.0, 0.0, np.random.default_rng(0), view="pa")
    np.testing.assert_allclose(ap, 0.0)
    R = g.rodrigues(torch.from_numpy(pa[:, :3]))
    torch.testing.assert_close(R, g.nominal_rotation("pa").expand(3, 3, 3))
    camera = g.Camera.centered(64, 64, spacing_mm=4.0)
    right = torch.tensor([[[50.0, 0.0, 0.0]]], dtype=torch.float64).expand(2, 1, 3)  # RAS: +x is the patient's right
    columns = g.project(right, torch.from_numpy(np.stack([ap[0], pa[0]])), camera)[:, 0, 0]
    assert columns[0] < 31.5 < columns[1]  # left half of the image in AP (radiological), right half in PA
    # The random part is the same draw in both views.
    a = g.sample_poses(4, 30.0, 10.0, np.random.default_rng(1))
    b = g.sample_poses(4, 30.0, 10.0, np.random.default_rng(1), view="pa")
    np.testing.assert_allclose(a[:, 3:], b[:, 3:])
    torch.testing.assert_close(
        g.rodrigues(torch.from_numpy(b[:, :3])),
        g.rodrigues(torch.from_numpy(a[:, :3])) @ g.nominal_rotation("pa"),
    )


@settings(max_examples=200, deadline=None)
@given(st.floats(-20, 52, allow_nan=False), st.floats(-20, 44, allow_nan=False))
def test_the_grid_edge_distance_is_signed_by_the_grid(x, y):
    point = torch.tensor([x, y], dtype=torch.float64)
    distance = float(g.grid_edge_distance(point, 24, 32))
    assert (distance >= 0) == bool(g.on_pixel_grid(point, 24, 32))
    # Moving the point by the distance's size along the nearest axis reaches the edge.
    inside = min(x + 0.5, 31.5 - x, y + 0.5, 23.5 - y)
    assert distance == pytest.approx(inside)


def test_the_grid_edge_distance_by_hand():
    points = torch.tensor([[0.0, 5.0], [-1.0, 5.0], [31.0, 5.0], [10.0, 12.0], [-3.0, -1.0]])
    assert g.grid_edge_distance(points, 24, 32).tolist() == [0.5, -0.5, 0.5, 10.5, -2.5]

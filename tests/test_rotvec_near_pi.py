"""rotation_to_rotvec near π, where the axis comes from the symmetric part (PA views reach this branch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pelmark.geometry import (
    Camera,
    nominal_rotation,
    project,
    rodrigues,
    rodrigues_host,
    rotation_to_rotvec,
    rotation_to_rotvec_host,
    sample_poses,
)


def _axes(n: int, seed: int) -> torch.Tensor:
    axes = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3)))
    return axes / axes.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("offset", [0.0, 1e-9, 1e-6, 5e-4, 9.9e-4])
def test_round_trip_within_1e_3_rad_of_pi(offset):
    rotvec = _axes(64, seed=7) * (math.pi - offset)
    matrix = rodrigues(rotvec)
    back = rotation_to_rotvec(matrix)
    torch.testing.assert_close(rodrigues(back), matrix, rtol=0, atol=1e-9)
    torch.testing.assert_close(back.norm(dim=-1), torch.full((64,), math.pi - offset, dtype=torch.float64), rtol=0, atol=1e-7)


# Unit axes, the coordinate axes and zero components (ties in the symmetric part's diagonal) included.
unit_axes = (
    st.tuples(*[st.floats(-1.0, 1.0)] * 3)
    .map(lambda v: torch.tensor(v, dtype=torch.float64))
    .filter(lambda v: float(v.norm()) > 0.1)
    .map(lambda v: v / v.norm())
)


@settings(max_examples=100, deadline=None)
@given(axis=unit_axes, offset=st.one_of(st.just(0.0), st.floats(0.0, 1e-3), st.floats(-1e-3, 0.0)))
def test_round_trip_near_pi_holds_for_any_axis(axis, offset):
    # offset < 0 is past π: the same rotation as 2π - θ about -axis.
    angle = math.pi - offset
    rotvec = axis * angle
    matrix = rodrigues(rotvec[None])
    back = rotation_to_rotvec(matrix)[0]
    torch.testing.assert_close(rodrigues(back[None]), matrix, rtol=0, atol=1e-9)
    assert abs(float(back.norm()) - min(angle, 2 * math.pi - angle)) < 1e-7
    assert float(back.norm()) <= math.pi + 1e-12
    if offset > 1e-6:
        # The axis's sign is fixed by the antisymmetric part, so the vector itself comes back.
        torch.testing.assert_close(back, rotvec, rtol=0, atol=1e-8)
    elif offset < -1e-6:
        torch.testing.assert_close(back, -axis * (2 * math.pi - angle), rtol=0, atol=1e-8)


def test_pa_nominal_view_by_hand():
    # PA: 180° about the superior (z) axis, so the rotation vector is ±π z.
    back = rotation_to_rotvec(nominal_rotation("pa")[None])[0]
    assert back.abs().tolist() == pytest.approx([0.0, 0.0, math.pi], abs=1e-12)


@pytest.mark.gpu
def test_pa_poses_register_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pelmark.registration import register, register_robust

    camera = Camera.centered(768, sdd_mm=1020.0, spacing_mm=0.388, sid_mm=850.0)
    rng = np.random.default_rng(3)
    poses = torch.from_numpy(sample_poses(8, 2.0, 10.0, rng, view="pa"))
    poses[0, :3] = torch.tensor([0.0, 0.0, math.pi], dtype=torch.float64)  # exactly PA: the near-π branch
    points = torch.from_numpy(rng.uniform(-1, 1, size=(8, 8, 3)) * np.array([120.0, 60.0, 80.0]))
    landmarks = project(points, poses, camera)
    assert rotation_to_rotvec(rodrigues(poses[:, :3].cuda())).is_cuda
    weights = torch.ones(8, 8, dtype=torch.float64, device="cuda")
    result = register(landmarks.cuda(), weights, points.cuda(), camera)
    assert not bool(result.degenerate.any())
    reprojected = project(points.cuda(), result.pose, camera)
    assert float((reprojected - landmarks.cuda()).norm(dim=-1).max()) < 1e-3
    robust = register_robust(landmarks.cuda(), weights, points.cuda(), camera)
    assert robust.inliers.is_cuda and bool(robust.inliers.all())


@settings(max_examples=100, deadline=None)
@given(axis=unit_axes, angle=st.one_of(st.floats(0.0, 1e-5), st.floats(0.0, math.pi), st.floats(math.pi - 1e-3, math.pi)))
def test_host_twin_agrees_everywhere(axis, angle):
    # The registration's host solver converts its closed-form rotation with the NumPy twin.
    matrix = rodrigues((axis * angle)[None])
    theirs = rotation_to_rotvec(matrix)
    ours = torch.from_numpy(rotation_to_rotvec_host(matrix.numpy()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.from_numpy(rodrigues_host(ours.numpy())), rodrigues(theirs), rtol=0, atol=1e-14)

"""Pose losses: hand-derived values, zero at equality, symmetry, finite gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.registration import PoseLoss, mtre_loss, pel_paper, pose_errors, pose_geodesic_loss, pose_loss

F64 = torch.float64


def _pose(rx=0.0, ry=0.0, rz=0.0, tx=0.0, ty=0.0, tz=0.0) -> torch.Tensor:
    return torch.tensor([[rx, ry, rz, tx, ty, tz]], dtype=F64)


def test_pel_paper_hand_values():
    # Differences (0, 0, 0, 6, 0, 0): sqrt(36 / 6) = sqrt(6).
    assert math.isclose(float(pel_paper(_pose(tx=6.0), _pose())), math.sqrt(6.0), rel_tol=1e-12)
    # (0.3, 0, 0, 0, 0.4, 0): sqrt((0.09 + 0.16) / 6) = 0.5 / sqrt(6); radians and mm mixed, as in eq. 10.
    assert math.isclose(float(pel_paper(_pose(rx=0.3, ty=0.4), _pose())), 0.5 / math.sqrt(6.0), rel_tol=1e-12)
    # Batch mean of per-sample RMSEs: (sqrt(6) + 0) / 2.
    both = pel_paper(torch.cat([_pose(tx=6.0), _pose(ty=1.0)]), torch.cat([_pose(), _pose(ty=1.0)]))
    assert math.isclose(float(both), math.sqrt(6.0) / 2.0, rel_tol=1e-12)


def test_geodesic_hand_values():
    # 90° about z and a (3, 4, 0) mm shift: 90 + 5 = 95.
    loss = pose_geodesic_loss(_pose(rz=math.pi / 2, tx=3.0, ty=4.0), _pose())
    assert math.isclose(float(loss), 95.0, rel_tol=1e-9)
    # The same rotation written two ways (angle 1.5π about a = 0.5π about -a) is 0° apart.
    axis = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    a = torch.cat([1.5 * math.pi * axis, torch.zeros(3, dtype=F64)])[None]
    b = torch.cat([-0.5 * math.pi * axis, torch.zeros(3, dtype=F64)])[None]
    rotation_deg, translation_mm = pose_errors(a, b)
    assert float(rotation_deg) < 1e-6 and float(translation_mm) == 0.0
    assert float(pel_paper(a, b)) > 1.0  # whereas eq. 10 sees 2π·0.8/√6 ≈ 2.05


def test_mtre_hand_values():
    points = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=F64)
    # A pure (3, 4, 0) shift moves every point 5 mm.
    assert math.isclose(float(mtre_loss(_pose(tx=3.0, ty=4.0), _pose(), points)), 5.0, rel_tol=1e-12)
    # 180° about z: (1, 0, 0) -> (-1, 0, 0) is 2 mm away; (0, 0, 1) on the axis stays: mean 1.
    assert math.isclose(float(mtre_loss(_pose(rz=math.pi), _pose(), points)), 1.0, rel_tol=1e-12)
    # Shared (L, 3) points broadcast over the batch.
    assert math.isclose(float(mtre_loss(_pose(tz=2.0), _pose(), points[0])), 2.0, rel_tol=1e-12)


@pytest.mark.parametrize("kind", list(PoseLoss))
def test_zero_at_equality_with_finite_gradient(kind):
    pose = torch.tensor([[0.3, -0.2, 0.1, 10.0, -5.0, 2.0]], dtype=F64, requires_grad=True)
    points = torch.randn(1, 8, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 50
    camera = Camera.centered(64, 64, spacing_mm=1.0)
    loss = pose_loss(kind, pose, pose.detach().clone(), points, camera)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(pose.grad).all()


def test_geodesic_is_symmetric_and_gradients_flow():
    generator = torch.Generator().manual_seed(1)
    a = (torch.rand(5, 6, dtype=F64, generator=generator) - 0.5) * torch.tensor([1, 1, 1, 50, 50, 50], dtype=F64)
    b = (torch.rand(5, 6, dtype=F64, generator=generator) - 0.5) * torch.tensor([1, 1, 1, 50, 50, 50], dtype=F64)
    torch.testing.assert_close(pose_geodesic_loss(a, b), pose_geodesic_loss(b, a))
    points = torch.randn(5, 8, 3, dtype=F64, generator=generator) * 50
    torch.testing.assert_close(mtre_loss(a, b, points), mtre_loss(b, a, points))
    a.requires_grad_(True)
    camera = Camera.centered(64, 64, spacing_mm=1.0)
    for kind in PoseLoss:
        a.grad = None
        pose_loss(kind, a, b, points, camera).backward()
        assert torch.isfinite(a.grad).all() and a.grad.abs().amax() > 0


def test_pose_loss_errors():
    pose = _pose()
    with pytest.raises(PelmarkError, match="points_world_mm"):
        pose_loss("mtre", pose, pose)
    with pytest.raises(PelmarkError, match="unknown pose loss"):
        pose_loss("l1", pose, pose)
    assert float(pose_loss("paper", _pose(tx=6.0), pose)) == pytest.approx(math.sqrt(6.0))

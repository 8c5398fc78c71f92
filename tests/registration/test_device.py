"""The layer on a GPU gives the CPU's answer (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from pelmark.registration import register, register_robust

from ._problems import make_problem


@pytest.mark.gpu
def test_cuda_matches_cpu():
    problem = make_problem(4, seed=60, noise_px=1.0)
    args = (problem.weights, problem.points_world_mm, problem.camera)
    cpu = register(problem.landmarks_px, *args)
    landmarks = problem.landmarks_px.cuda().requires_grad_(True)
    gpu = register(landmarks, problem.weights.cuda(), problem.points_world_mm.cuda(), problem.camera)
    assert gpu.pose.is_cuda
    torch.testing.assert_close(gpu.pose.cpu(), cpu.pose, rtol=0, atol=1e-6)
    gpu.pose.sum().backward()
    assert torch.isfinite(landmarks.grad).all()
    on_gpu = (problem.landmarks_px.cuda(), problem.weights.cuda(), problem.points_world_mm.cuda())
    robust = register_robust(*on_gpu, problem.camera)
    assert robust.inliers.is_cuda

"""RANSAC registration for evaluation: hypotheses from landmark subsets, LM on the inliers.

Every hypothesis is a batched LM solve on a subset of the visible landmarks
(all C(L, k) subsets when there are at most ``max_subsets``, e.g. C(8, 4) = 70,
otherwise ``max_subsets`` drawn with the caller's ``torch.Generator``), started
from the closed form on all visible landmarks (identity where that fails). The
hypothesis with the lowest truncated squared error over all visible landmarks
(MSAC) wins; LM then refines on its inliers, and the inlier set is updated from
the refined pose until it stops changing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, project_with_depth
from pelmark.registration.api import register
from pelmark.registration.checks import prepare
from pelmark.registration.init import initial_pose
from pelmark.registration.lm import solve_lm
from pelmark.registration.options import Init, RegistrationSettings, Solver
from pelmark.registration.result import RobustResult
from pelmark.types import Landmarks2D, Landmarks3D, Weights


@dataclasses.dataclass(frozen=True)
class RansacSettings:
    """How :func:`register_robust` samples, scores and refines hypotheses.

    Attributes:
        threshold_px: reprojection error below which a landmark is an inlier.
        subset_size: landmarks per hypothesis (4 is the least that fixes a pose).
        max_subsets: enumerate all subsets up to this many, otherwise draw this many.
        subset_iterations: LM iterations per hypothesis (they start close, and are only hypotheses).
        refinement_rounds: at most this many refit / re-select rounds on the inliers.
    """

    threshold_px: float = 10.0
    subset_size: int = 4
    max_subsets: int = 128
    subset_iterations: int = 15
    refinement_rounds: int = 3


# A pose is confirmed when at least one landmark beyond the minimal subset it was fitted through agrees with it:
# four points fit some pose within the threshold almost wherever they lie (8 equations, 6 unknowns).
# pelmark eval --refine and pelmark predict keep the raw detections of an unconfirmed pose.
MIN_INLIERS = RansacSettings.subset_size + 1


def unconfirmed(degenerate, inliers):
    """Whether a pose is not degenerate but has fewer than :data:`MIN_INLIERS` inliers.

    Args:
        degenerate: a bool, or (N,) bools, per image.
        inliers: (L,) or (N, L) bools: the landmarks the fit kept.
    """
    return ~np.asarray(degenerate, dtype=bool) & (np.asarray(inliers, dtype=bool).sum(axis=-1) < MIN_INLIERS)


def register_robust(
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
    ransac: RansacSettings = RansacSettings(),
    settings: RegistrationSettings = RegistrationSettings(),
    generator: torch.Generator | None = None,
) -> RobustResult:
    """RANSAC over landmark subsets, then :func:`register` (lm) on the inliers.

    Args:
        landmarks_px: (B, L, 2) detections.
        weights: (B, L) weights; 0 marks an invisible landmark.
        points_world_mm: (B, L, 3) or (L, 3) landmarks in the world frame.
        camera: the detector and nominal C-arm.
        ransac: threshold and subset sampling.
        settings: LM tolerances and the depth clamp.
        generator: source of random subsets when not all are enumerated (CPU);
            a fixed seed is used when None, so results are always reproducible.

    Returns:
        A :class:`RobustResult`; its ``result`` is differentiable as :func:`register`'s
        (the inlier selection itself is a constant).

    Raises:
        PelmarkError: on bad shapes or settings.
    """
    count = landmarks_px.shape[1] if landmarks_px.ndim == 3 else 0
    if not 1 <= ransac.subset_size <= count:
        raise PelmarkError(f"subset_size must be in [1, {count}], got {ransac.subset_size}")
    problem = prepare(landmarks_px, weights, points_world_mm, settings)
    landmarks = problem.landmarks_px.detach()
    points = problem.points_world_mm.detach()
    visible = problem.visible_weights.detach() > 0
    subsets = _subsets(count, ransac, generator).to(landmarks.device)  # (H, L) bool

    best_pose, found = _best_hypothesis(
        landmarks, problem.visible_weights.detach(), points, camera, subsets, ransac, settings
    )
    first_inliers = _inliers(best_pose, landmarks, points, visible, camera, ransac, settings)
    inliers = torch.where(found[:, None], first_inliers, visible)

    # Refit on the inliers and re-select them from the refit pose until the set is
    # stable; the returned result is always the fit to the returned inliers.
    init = best_pose
    rounds = max(1, ransac.refinement_rounds)
    for round_index in range(rounds):
        kept = weights * inliers.to(weights.dtype)
        result = register(landmarks_px, kept, points_world_mm, camera, Solver.LM, init, settings)
        if round_index == rounds - 1:
            break
        refit = result.pose.detach().to(torch.float64)
        selected = _inliers(refit, landmarks, points, visible, camera, ransac, settings)
        selected = torch.where(result.degenerate[:, None], inliers, selected)
        if bool((selected == inliers).all()):
            break
        inliers, init = selected, refit
    return RobustResult(result=result, inliers=inliers, hypotheses=int(subsets.shape[0]))


def _subsets(count: int, ransac: RansacSettings, generator: torch.Generator | None) -> Tensor:
    """(H, L) membership of each hypothesis' subset: all of them, or ``max_subsets`` random ones."""
    size = ransac.subset_size
    if math.comb(count, size) <= ransac.max_subsets:
        index = torch.tensor(list(itertools.combinations(range(count), size)), dtype=torch.int64)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        index = torch.rand(ransac.max_subsets, count, generator=generator).argsort(-1)[:, :size]
    membership = torch.zeros(index.shape[0], count, dtype=torch.bool)
    return membership.scatter(1, index, True)


def _best_hypothesis(
    landmarks: Tensor,
    weights: Tensor,
    points: Tensor,
    camera: Camera,
    subsets: Tensor,
    ransac: RansacSettings,
    settings: RegistrationSettings,
) -> tuple[Tensor, Tensor]:
    """(B, 6) pose of the best subset hypothesis per sample and (B,) whether any was valid."""
    batch, count = weights.shape
    hypotheses = subsets.shape[0]
    start = initial_pose(Init.CLOSED_FORM, landmarks, weights, points, camera, settings.min_depth_mm)

    subset_weights = (weights[:, None, :] * subsets[None].to(weights.dtype)).reshape(batch * hypotheses, count)
    subset_landmarks = landmarks.repeat_interleave(hypotheses, dim=0)
    subset_points = points.repeat_interleave(hypotheses, dim=0)
    subset_problem = prepare(subset_landmarks, subset_weights, subset_points, settings)
    lm_settings = dataclasses.replace(settings.lm, max_iterations=ransac.subset_iterations)
    state = solve_lm(
        subset_problem.landmarks_px,
        subset_problem.weights,
        subset_problem.points_world_mm,
        camera,
        start.repeat_interleave(hypotheses, dim=0),
        subset_problem.keep,
        lm_settings,
        settings.min_depth_mm,
    )

    pixels, depth = project_with_depth(subset_points, state.pose, camera, settings.min_depth_mm)
    error2 = (pixels - subset_landmarks).square().sum(-1)
    visible = (weights > 0).repeat_interleave(hypotheses, dim=0)
    truncated = torch.where(visible, error2.clamp(max=ransac.threshold_px**2), torch.zeros_like(error2))
    behind = (visible & (depth <= settings.min_depth_mm)).any(-1)
    valid = subset_problem.keep & ~behind & torch.isfinite(state.pose).all(-1) & torch.isfinite(truncated).all(-1)
    score = torch.where(valid, truncated.sum(-1), torch.full_like(truncated[:, 0], math.inf)).reshape(batch, hypotheses)
    best = score.argmin(-1)
    poses = state.pose.reshape(batch, hypotheses, 6)[torch.arange(batch, device=best.device), best]
    found = torch.isfinite(score.amin(-1))
    return torch.where(found[:, None], poses, start), found


def _inliers(
    pose: Tensor,
    landmarks: Tensor,
    points: Tensor,
    visible: Tensor,
    camera: Camera,
    ransac: RansacSettings,
    settings: RegistrationSettings,
) -> Tensor:
    """(B, L) visible landmarks whose reprojection error under ``pose`` is below the threshold."""
    pixels, _ = project_with_depth(points, pose, camera, settings.min_depth_mm)
    return visible & ((pixels - landmarks).norm(dim=-1) < ransac.threshold_px)

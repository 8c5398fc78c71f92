"""Batched Levenberg-Marquardt on the registration cost, in float64, without autograd.

Each iteration solves (JᵀWJ + λ diag(JᵀWJ)) δ = -JᵀWe for every sample at once
(Cholesky, one 6x6 system per sample) in the local chart δ = (ω, τ) (see
:mod:`pelmark.registration.objective`), tries θ ⊕ δ, keeps it where the cost
went down (λ /= 10) and otherwise keeps θ (λ *= 10). A sample stops with a
step that is negligible, either in size (``step_tolerance``, relative to |θ|)
or in the cost decrease the linear model predicts for it (``cost_tolerance``,
relative); the loop ends when every sample has stopped. Gradients are
not taken through these iterations: see :mod:`pelmark.registration.implicit`.

The iterations run in NumPy on the host, whatever the inputs' device (see
:mod:`pelmark.registration.host` for why); the state comes back as tensors on
the inputs' device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pelmark.geometry import Camera
from pelmark.registration import host
from pelmark.registration.options import LMSettings
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights

_MIN_DAMPING = 1e-15


@dataclasses.dataclass(frozen=True)
class LMState:
    """Where a batched solve stopped.

    Attributes:
        pose: (B, 6) float64 solutions, |r| ≤ π.
        start: (B, 6) the starting pose each sample used (the best of the candidates).
        cost: (B,) weighted squared reprojection error at the last evaluated pose.
        gauss_newton: (B, 6, 6) JᵀWJ in the chart δ = (ω, τ) at the last evaluated pose.
        pixels: (B, L, 2) projections at the last evaluated pose.
        depth_mm: (B, L) depths at the last evaluated pose. (A converged sample's
            last step was negligible and taken without evaluating it.)
        iterations: (B,) iterations run.
        converged: (B,) a stopping rule was met before ``max_iterations``.
    """

    pose: Pose
    start: Pose
    cost: Tensor
    gauss_newton: Tensor
    pixels: Tensor
    depth_mm: Tensor
    iterations: Tensor
    converged: Tensor


def solve_lm(
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
    starts: Tensor,
    active: Tensor,
    settings: LMSettings,
    min_depth_mm: float,
) -> LMState:
    """Minimise Σ w |π(θ) - l|² per sample.

    Args:
        landmarks_px: (B, L, 2) float64 detections.
        weights: (B, L) float64 weights.
        points_world_mm: (B, L, 3) float64 world points.
        camera: the detector and nominal C-arm.
        starts: (B, 6) starting poses, or (K, B, 6) candidates of which each
            sample starts from the one with the lowest cost (the candidates are
            evaluated in one batched call, which costs about as much as one),
            all with |r| ≤ π (see :func:`~pelmark.registration.host.wrap_rotation`).
        active: (B,) samples to solve; the others keep their start.
        settings: stopping rules.
        min_depth_mm: depth clamp.

    Returns:
        The final :class:`LMState`, as tensors on the inputs' device (no gradient).
    """
    device = landmarks_px.device
    arrays = (host.to_host(x) for x in (landmarks_px, weights, points_world_mm, starts, active))
    state = solve_lm_host(*arrays, camera, settings, min_depth_mm)
    return LMState(**{field: torch.from_numpy(value).to(device) for field, value in state._asdict().items()})


class HostLMState(NamedTuple):
    """:class:`LMState` as float64 (and int64, bool) NumPy arrays on the host."""

    pose: np.ndarray
    start: np.ndarray
    cost: np.ndarray
    gauss_newton: np.ndarray
    pixels: np.ndarray
    depth_mm: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray


def solve_lm_host(
    landmarks_px: np.ndarray,
    weights: np.ndarray,
    points_world_mm: np.ndarray,
    starts: np.ndarray,
    active: np.ndarray,
    camera: Camera,
    settings: LMSettings,
    min_depth_mm: float,
) -> HostLMState:
    """:func:`solve_lm` on host arrays (float64, ``active`` bool)."""
    starts = starts if starts.ndim == 3 else starts[None]
    # Overflow or 0/0 in a diverging sample is caught by the cost test and the checks after the
    # solve, as it is silently in torch: NumPy is told not to warn.
    rows = host.weight_rows(weights)
    with np.errstate(all="ignore"):
        evaluated = _best_start(landmarks_px, rows, points_world_mm, camera, starts, min_depth_mm)
        return _iterate(landmarks_px, weights, rows, points_world_mm, camera, *evaluated, active, settings, min_depth_mm)


def _best_start(
    landmarks_px: np.ndarray,
    weight_rows: np.ndarray,
    points_world_mm: np.ndarray,
    camera: Camera,
    starts: np.ndarray,
    min_depth_mm: float,
) -> tuple[np.ndarray, ...]:
    """The candidate with the lowest cost per sample, and its evaluation (system, pixels, depths).

    ``weight_rows``: :func:`pelmark.registration.host.weight_rows` of the weights.
    """
    count, batch = starts.shape[:2]
    starts = starts.reshape(count * batch, 6)
    evaluated = host.evaluate(
        np.concatenate([landmarks_px] * count),
        np.concatenate([weight_rows] * count),
        np.concatenate([points_world_mm] * count),
        camera,
        starts,
        min_depth_mm,
    )
    if count == 1:
        return (starts, *evaluated)
    cost = evaluated[0][:, 6, 6]
    cost = np.where(np.isfinite(cost), cost, math.inf)
    # The first candidate wins ties (argmin returns the first minimum).
    index = np.arange(batch) + batch * cost.reshape(count, batch).argmin(0)
    return tuple(x[index] for x in (starts, *evaluated))


def _iterate(
    landmarks_px: np.ndarray,
    weights: np.ndarray,
    weight_rows: np.ndarray,
    points_world_mm: np.ndarray,
    camera: Camera,
    start: np.ndarray,
    system: np.ndarray,
    pixels: np.ndarray,
    depth: np.ndarray,
    active: np.ndarray,
    settings: LMSettings,
    min_depth_mm: float,
) -> HostLMState:
    # JᵀWJ, -JᵀWe and the cost share one array, so an accepted step is one where for all three.
    batch = start.shape[0]
    pose = start
    damping = np.full((batch, 1), settings.initial_damping)  # λ per sample, a column to scale diag(JᵀWJ)
    # The cost is good to about 32 eps Σ w |e| (|l| + |e|) ≤ 32 eps (√(Σ w |l|²) + √E) √E (Cauchy-Schwarz).
    rounding = 32.0 * np.finfo(np.float64).eps
    landmark_norm = np.sqrt(host.weighted_cost(landmarks_px, weights))
    iterations = np.zeros(batch, dtype=np.int64)
    converged = np.zeros(batch, dtype=bool)

    for _ in range(settings.max_iterations):
        if not active.any():
            break
        diagonal = np.diagonal(system, axis1=1, axis2=2)  # diag(JᵀWJ), then the cost
        cost = diagonal[:, 6]
        descent = system[:, :6, 6]  # -JᵀWe
        # A failed factorisation (all weights 0, or no signal in a direction) gives a
        # zero step: the sample's λ then grows until it stops, flagged later as singular.
        scaled_diag = damping * diagonal[:, :6]
        damped = system[:, :6, :6].copy()
        damped[:, range(6), range(6)] += scaled_diag
        step, factored = host.solve_definite(damped, descent)
        step = np.where(factored[:, None], step, 0.0)
        trial = host.retract(pose, step)

        # A negligible step is taken without evaluating it: its effect on the
        # cost is below rounding, and skipping that evaluation saves a whole
        # iteration per solve. Pixels, depths and JᵀWJ stay those of the last
        # evaluated pose, which differs from the returned one by that step.
        # From (H + λD) δ = -g the model decrease -(2gᵀδ + δᵀHδ) is -gᵀδ + λ δᵀDδ = (-g + λDδ)ᵀδ.
        predicted = ((descent + scaled_diag * step) * step).sum(-1)
        step_norm = np.sqrt((step * step).sum(-1))
        pose_norm = np.sqrt((pose * pose).sum(-1))
        small_step = step_norm <= settings.step_tolerance * (pose_norm + settings.step_tolerance)
        final = active & factored & (small_step | (predicted <= settings.cost_tolerance * cost))
        iterations += active
        active = active & ~final
        if ((trial[:, :3] * trial[:, :3]).sum(-1) > math.pi**2).any():
            trial = host.wrap_rotation(trial)
        if final.any():
            pose = np.where(final[:, None], trial, pose)
            converged |= final
            if not active.any():
                break

        index = np.flatnonzero(active)
        if len(index) * 2 > batch:
            trial_system, trial_pixels, trial_depth = host.evaluate(
                landmarks_px, weight_rows, points_world_mm, camera, trial, min_depth_mm
            )
        else:
            # Most samples have stopped (RANSAC's many short solves): evaluate only the others. The
            # stopped rows keep their values, which the acceptance test below leaves alone.
            evaluated = host.evaluate(
                landmarks_px[index], weight_rows[index], points_world_mm[index], camera, trial[index], min_depth_mm
            )
            trial_system, trial_pixels, trial_depth = system.copy(), pixels.copy(), depth.copy()
            trial_system[index], trial_pixels[index], trial_depth[index] = evaluated
        # Near the minimum the cost changes by less than its own rounding error,
        # so a step that does not raise it beyond that error counts as a descent:
        # rejecting it would only inflate λ and stop short of the minimum.
        root_cost = np.sqrt(cost)
        bound = cost + rounding * (root_cost + landmark_norm) * root_cost
        accept = active & (trial_system[:, 6, 6] < bound)  # False for NaN
        accept_2d = accept[:, None]

        pose = np.where(accept_2d, trial, pose)
        system = np.where(accept[:, None, None], trial_system, system)
        pixels = np.where(accept[:, None, None], trial_pixels, pixels)
        depth = np.where(accept_2d, trial_depth, depth)
        damping = np.maximum(damping * np.where(accept_2d, 0.1, 10.0), _MIN_DAMPING)
        active = active & (damping[:, 0] <= settings.max_damping)

    return HostLMState(
        pose=pose,
        start=start,
        cost=system[:, 6, 6].copy(),
        gauss_newton=system[:, :6, :6].copy(),
        pixels=pixels,
        depth_mm=depth,
        iterations=iterations,
        converged=converged,
    )

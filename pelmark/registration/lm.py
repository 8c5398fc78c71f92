"""Batched Levenberg-Marquardt on the registration cost, in float64, without autograd.

Each iteration solves (JᵀWJ + λ diag(JᵀWJ)) δ = -JᵀWe for every sample at once
(Cholesky, one 6x6 system per sample) in the local chart δ = (ω, τ) (see
:mod:`pelmark.registration.objective`), tries θ ⊕ δ, keeps it where the cost
went down (λ /= 10) and otherwise keeps θ (λ *= 10). A sample stops with a
step that is negligible, either in size (``step_tolerance``, relative to |θ|)
or in the cost decrease the linear model predicts for it (``cost_tolerance``,
relative); the loop ends when every sample has stopped. Gradients are
not taken through these iterations: see :mod:`pelmark.registration.implicit`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from pelmark.geometry import Camera
from pelmark.registration.objective import (
    linearise,
    normal_system,
    retract,
    weighted_cost,
    wrap_rotation,
)
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
            evaluated in one batched call, which costs about as much as one).
        active: (B,) samples to solve; the others keep their start.
        settings: stopping rules.
        min_depth_mm: depth clamp.

    Returns:
        The final :class:`LMState`.
    """
    # Inference mode skips autograd's bookkeeping on every kernel; the caller's tensors only
    # enter as inputs, and what leaves is cloned into ordinary tensors.
    with torch.inference_mode():
        starts = starts if starts.ndim == 3 else starts[None]
        evaluated = _best_start(landmarks_px, weights, points_world_mm, camera, starts, min_depth_mm)
        state = _iterate(landmarks_px, weights, points_world_mm, camera, *evaluated, active, settings, min_depth_mm)
    return LMState(**{field.name: getattr(state, field.name).clone() for field in dataclasses.fields(state)})


def _evaluate(
    landmarks_px: Tensor, weights: Tensor, points_world_mm: Tensor, camera: Camera, pose: Tensor, min_depth_mm: float
) -> tuple[Tensor, Tensor, Tensor]:
    """At ``pose``: [J | e]ᵀ W [J | e] (B, 7, 7) (JᵀWJ, JᵀWe and the cost, see
    :func:`~pelmark.registration.objective.normal_system`), pixels (B, L, 2) and depths (B, L)."""
    lin = linearise(points_world_mm, pose, camera, min_depth_mm)
    return normal_system(lin, lin.pixels - landmarks_px, weights), lin.pixels, lin.depth_mm


def _best_start(
    landmarks_px: Tensor, weights: Tensor, points_world_mm: Tensor, camera: Camera, starts: Tensor, min_depth_mm: float
) -> tuple[Tensor, ...]:
    """The candidate with the lowest cost per sample, and its evaluation."""
    count, batch = starts.shape[:2]
    starts = starts.reshape(count * batch, 6)
    if bool((torch.linalg.vector_norm(starts[:, :3], dim=-1) > math.pi).any()):
        starts = wrap_rotation(starts)
    evaluated = _evaluate(
        landmarks_px.repeat(count, 1, 1),
        weights.repeat(count, 1),
        points_world_mm.repeat(count, 1, 1),
        camera,
        starts,
        min_depth_mm,
    )
    if count == 1:
        return (starts, *evaluated)
    cost = evaluated[0][:, 6, 6]
    cost = torch.where(torch.isfinite(cost), cost, math.inf)
    # The first candidate wins ties (argmin returns the first minimum).
    index = cost.reshape(count, batch).argmin(0) * batch + torch.arange(batch, device=starts.device)
    return tuple(x[index] for x in (starts, *evaluated))


def _iterate(
    landmarks_px: Tensor,
    weights: Tensor,
    points_world_mm: Tensor,
    camera: Camera,
    start: Tensor,
    system: Tensor,
    pixels: Tensor,
    depth: Tensor,
    active: Tensor,
    settings: LMSettings,
    min_depth_mm: float,
) -> LMState:
    # The loop is dispatch-bound (each kernel works on a few hundred numbers), so it is
    # written for few kernels: JᵀWJ, JᵀWe and the cost share one tensor (one where per
    # accepted step instead of three), and views replace copies where they can.
    batch = start.shape[0]
    device = start.device
    pose = start
    # λ per sample, as a column to scale the rows of JᵀWJ's diagonal.
    damping = torch.full((batch, 1), settings.initial_damping, dtype=pose.dtype, device=device)
    zero, down, up = pose.new_tensor([0.0, 0.1, 10.0]).unbind()  # where() takes tensors faster than floats
    # The cost is good to about 32 eps Σ w |e| (|l| + |e|) ≤ 32 eps (√(Σ w |l|²) + √E) √E (Cauchy-Schwarz).
    rounding = 32.0 * torch.finfo(pose.dtype).eps
    landmark_norm = weighted_cost(landmarks_px, weights).sqrt()
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)

    running = bool(active.any())
    for _ in range(settings.max_iterations):
        if not running:
            break
        diagonal = system.diagonal(dim1=-2, dim2=-1)  # diag(JᵀWJ), then the cost
        cost = diagonal[:, 6]
        gradient = system[:, :6, 6:]
        # A failed factorisation (all weights 0, or no signal in a direction) gives a
        # zero step: the sample's λ then grows until it stops, flagged later as singular.
        scaled_diag = damping * diagonal[:, :6]
        factor, info = torch.linalg.cholesky_ex(system[:, :6, :6] + torch.diag_embed(scaled_diag))
        factored = info == 0
        # -(H + λD)⁻¹ g, negated after the solve (exactly the same numbers: rounding is symmetric).
        step = torch.where(factored.unsqueeze(-1), torch.cholesky_solve(gradient, factor).squeeze(-1), zero).neg_()
        trial = retract(pose, step)
        # Whether to wrap shares one synchronisation with the host with the stopping test below.
        rotation2 = trial[:, :3].square().sum(-1)

        # A negligible step is taken without evaluating it: its effect on the
        # cost is below rounding, and skipping that evaluation saves a whole
        # iteration per solve. Pixels, depths and JᵀWJ stay those of the last
        # evaluated pose, which differs from the returned one by that step.
        # From (H + λD) δ = -g the model decrease -(2gᵀδ + δᵀHδ) is -gᵀδ + λ δᵀDδ.
        predicted = ((scaled_diag * step - gradient.squeeze(-1)) * step).sum(-1)
        step_norm, pose_norm = torch.linalg.vector_norm(torch.stack([step, pose]), dim=-1).unbind()
        small_step = step_norm <= settings.step_tolerance * (pose_norm + settings.step_tolerance)
        final = active & factored & (small_step | (predicted <= settings.cost_tolerance * cost))
        wrap, any_final = torch.stack([(rotation2 > math.pi**2).any(), final.any()]).tolist()
        if wrap:
            trial = wrap_rotation(trial)
        if any_final:
            pose = torch.where(final.unsqueeze(-1), trial, pose)
            iterations = iterations + final
            converged = converged | final
            active = active & ~final
            if not bool(active.any()):
                break

        trial_system, trial_pixels, trial_depth = _evaluate(
            landmarks_px, weights, points_world_mm, camera, trial, min_depth_mm
        )
        # Near the minimum the cost changes by less than its own rounding error,
        # so a step that does not raise it beyond that error counts as a descent:
        # rejecting it would only inflate λ and stop short of the minimum.
        root_cost = cost.sqrt()
        slack = rounding * (root_cost + landmark_norm) * root_cost
        accept = active & (trial_system[:, 6, 6] < cost + slack)  # False for NaN
        accept_2d, accept_3d = accept.unsqueeze(-1), accept.view(-1, 1, 1)

        pose = torch.where(accept_2d, trial, pose)
        system = torch.where(accept_3d, trial_system, system)
        pixels = torch.where(accept_3d, trial_pixels, pixels)
        depth = torch.where(accept_2d, trial_depth, depth)
        damping = (damping * torch.where(accept_2d, down, up)).clamp_min_(_MIN_DAMPING)
        iterations = iterations + active
        active = active & (damping.squeeze(-1) <= settings.max_damping)
        running = bool(active.any())

    return LMState(
        pose=pose,
        start=start,
        cost=system[:, 6, 6],
        gauss_newton=system[:, :6, :6],
        pixels=pixels,
        depth_mm=depth,
        iterations=iterations,
        converged=converged,
    )

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
            evaluated in one batched call, which costs about as much as one),
            all with |r| ≤ π (see :func:`~pelmark.registration.objective.wrap_rotation`).
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
    """At ``pose``: [J | -e]ᵀ W [J | -e] (B, 7, 7) (JᵀWJ, -JᵀWe and the cost, see
    :func:`~pelmark.registration.objective.normal_system`), pixels (B, L, 2) and depths (B, L)."""
    lin = linearise(points_world_mm, pose, camera, min_depth_mm)
    # With the residual's sign flipped the system holds -JᵀWe, the steepest descent direction, and
    # the same JᵀWJ and cost bit for bit (rounding is symmetric): the solve then needs no negation.
    return normal_system(lin, landmarks_px - lin.pixels, weights), lin.pixels, lin.depth_mm


def _best_start(
    landmarks_px: Tensor, weights: Tensor, points_world_mm: Tensor, camera: Camera, starts: Tensor, min_depth_mm: float
) -> tuple[Tensor, ...]:
    """The candidate with the lowest cost per sample, and its evaluation."""
    count, batch = starts.shape[:2]
    starts = starts.reshape(count * batch, 6)
    # cat rather than repeat: the same copies in one cheaper kernel each.
    evaluated = _evaluate(
        torch.cat([landmarks_px] * count),
        torch.cat([weights] * count),
        torch.cat([points_world_mm] * count),
        camera,
        starts,
        min_depth_mm,
    )
    if count == 1:
        return (starts, *evaluated)
    cost = torch.nan_to_num(evaluated[0][:, 6, 6], nan=math.inf, posinf=math.inf, neginf=math.inf)
    # The first candidate wins ties (argmin returns the first minimum).
    index = torch.add(torch.arange(batch, device=starts.device), cost.view(count, batch).argmin(0), alpha=batch)
    return tuple(x.index_select(0, index) for x in (starts, *evaluated))


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
    # written for few kernels: JᵀWJ, -JᵀWe and the cost share one tensor (one where per
    # accepted step instead of three), views replace copies where they can, and the host
    # reads the device once per iteration.
    batch = start.shape[0]
    pose = start
    # λ per sample, as a column to scale the rows of JᵀWJ's diagonal.
    damping = torch.full((batch, 1), settings.initial_damping, dtype=pose.dtype, device=pose.device)
    zero, down, up = pose.new_tensor([0.0, 0.1, 10.0]).unbind()  # where() takes tensors faster than floats
    # The cost is good to about 32 eps Σ w |e| (|l| + |e|) ≤ 32 eps (√(Σ w |l|²) + √E) √E (Cauchy-Schwarz).
    rounding = 32.0 * torch.finfo(pose.dtype).eps
    landmark_norm = weighted_cost(landmarks_px, weights).sqrt()
    # Which samples ran (stopped) in each iteration: counted (or-ed) once at the end.
    ran, stopped = [], []

    for _ in range(settings.max_iterations):
        diagonal = system.diagonal(dim1=-2, dim2=-1)  # diag(JᵀWJ), then the cost
        cost = diagonal[:, 6]
        descent = system[:, :6, 6:]  # -JᵀWe
        # A failed factorisation (all weights 0, or no signal in a direction) gives a
        # zero step: the sample's λ then grows until it stops, flagged later as singular.
        scaled_diag = damping * diagonal[:, :6]
        damped = system[:, :6, :6].clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(scaled_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        factored = info.logical_not()
        step = torch.where(factored.unsqueeze(-1), torch.cholesky_solve(descent, factor).squeeze(-1), zero)
        trial = retract(pose, step)

        # A negligible step is taken without evaluating it: its effect on the
        # cost is below rounding, and skipping that evaluation saves a whole
        # iteration per solve. Pixels, depths and JᵀWJ stay those of the last
        # evaluated pose, which differs from the returned one by that step.
        # From (H + λD) δ = -g the model decrease -(2gᵀδ + δᵀHδ) is -gᵀδ + λ δᵀDδ = (-g + λDδ)ᵀδ.
        predicted = (torch.addcmul(descent.squeeze(-1), scaled_diag, step) * step).sum(-1)
        step_norm, pose_norm = torch.linalg.vector_norm(step, dim=-1), torch.linalg.vector_norm(pose, dim=-1)
        small_step = step_norm <= settings.step_tolerance * (pose_norm + settings.step_tolerance)
        final = active & factored & (small_step | (predicted <= settings.cost_tolerance * cost))
        remaining = active ^ final  # final ⊆ active
        # The one read of the iteration: whether to wrap (the test of wrap_rotation), whether
        # any sample stopped, and whether any is left.
        wrap, any_final, any_remaining = (
            torch.stack([torch.linalg.vector_norm(trial[:, :3], dim=-1) > math.pi, final, remaining])
            .any(-1)
            .tolist()
        )
        if not (any_final or any_remaining):
            break  # no sample was active
        ran.append(active)
        active = remaining
        if wrap:
            trial = wrap_rotation(trial)
        if any_final:
            pose = torch.where(final.unsqueeze(-1), trial, pose)
            stopped.append(final)
            if not any_remaining:
                break

        trial_system, trial_pixels, trial_depth = _evaluate(
            landmarks_px, weights, points_world_mm, camera, trial, min_depth_mm
        )
        # Near the minimum the cost changes by less than its own rounding error,
        # so a step that does not raise it beyond that error counts as a descent:
        # rejecting it would only inflate λ and stop short of the minimum.
        root_cost = cost.sqrt()
        bound = torch.addcmul(cost, root_cost + landmark_norm, root_cost, value=rounding)
        accept = active & (trial_system[:, 6, 6] < bound)  # False for NaN
        accept_2d, accept_3d = accept.unsqueeze(-1), accept.view(-1, 1, 1)

        pose = torch.where(accept_2d, trial, pose)
        system = torch.where(accept_3d, trial_system, system)
        pixels = torch.where(accept_3d, trial_pixels, pixels)
        depth = torch.where(accept_2d, trial_depth, depth)
        damping = (damping * torch.where(accept_2d, down, up)).clamp_min_(_MIN_DAMPING)
        active = active & (damping.squeeze(-1) <= settings.max_damping)

    return LMState(
        pose=pose,
        start=start,
        cost=system[:, 6, 6],
        gauss_newton=system[:, :6, :6],
        pixels=pixels,
        depth_mm=depth,
        iterations=torch.stack(ran).sum(0) if ran else torch.zeros(batch, dtype=torch.int64, device=pose.device),
        converged=torch.stack(stopped).any(0) if stopped else torch.zeros_like(active),
    )

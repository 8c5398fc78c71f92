"""``register``: the differentiable 2D/3D landmark registration layer (paper eqs. 3-8)."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, project_host
from pelmark.registration import host
from pelmark.registration.checks import Problem, prepare, solution_reason
from pelmark.registration.implicit import ImplicitPose
from pelmark.registration.init import initial_pose, starting_poses_host
from pelmark.registration.lm import solve_lm_host
from pelmark.registration.options import Init, RegistrationSettings, Solver
from pelmark.registration.result import RegistrationResult
from pelmark.registration.threads import small_problem_threads
from pelmark.registration.unrolled import Box, Objective, solve_adam, solve_lbfgs
from pelmark.types import Landmarks2D, Landmarks3D, Weights


def register(
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    camera: Camera,
    solver: Solver | str = Solver.LM,
    init: Init | str | Tensor | None = None,
    settings: RegistrationSettings = RegistrationSettings(),
) -> RegistrationResult:
    """Find per sample the pose θ minimising Σ_i w_i |π(p_i; θ) - l_i|² (paper eq. 4).

    Args:
        landmarks_px: (B, L, 2) detections (x = column, y = row), any float dtype;
            the pose comes back in this dtype.
        weights: (B, L) non-negative confidences; 0 marks a landmark that is not
            visible (its coordinates may then be NaN).
        points_world_mm: (B, L, 3) or (L, 3) landmarks in the world frame.
        camera: the detector and nominal C-arm.
        solver: ``lm`` (converged, implicit backward), or the paper's unrolled
            ``adam`` / ``lbfgs`` (backward through the iterations).
        init: ``identity``, ``closed_form`` or a (B, 6) pose (treated as a
            constant). Default: ``closed_form`` for lm (identity where the
            closed form is unusable or fits worse), ``identity`` for adam and
            lbfgs, as in the paper.
        settings: tolerances, schedules, bounds and the depth clamp.

    Returns:
        A :class:`RegistrationResult`. Degenerate samples (see
        :class:`~pelmark.registration.options.Degeneracy`) keep their initial
        pose, get zero gradient, and never make the rest of the batch fail.

    Raises:
        PelmarkError: on wrong shapes, negative weights, or an unknown solver/init.
    """
    kind = _solver(solver)
    # LM computes on the host on small arrays (registration.host), whatever the inputs' device: its
    # few torch factorisations there run on one CPU thread (its backward's too, see ImplicitPose).
    # The paper's unrolled solvers are left as they were: their backward runs outside this call.
    threads = (
        small_problem_threads(torch.device("cpu"), landmarks_px.numel() // 2)
        if kind is Solver.LM
        else contextlib.nullcontext()
    )
    with threads:
        problem = prepare(landmarks_px, weights, points_world_mm, settings)
        if init is None:
            init = Init.CLOSED_FORM if kind is Solver.LM else Init.IDENTITY
        detached = (problem.landmarks_px.detach(), problem.weights.detach(), problem.points_world_mm.detach())
        inputs = (problem.landmarks_px, problem.weights, problem.points_world_mm)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
        if kind is Solver.LM:
            solved = _run_lm(problem, detached, camera, init, settings, needs_grad)
        else:
            start = initial_pose(init, *detached, camera, settings.min_depth_mm)
            solved = _run_unrolled(kind, problem, camera, start, settings, needs_grad)

    dtype = landmarks_px.dtype if landmarks_px.is_floating_point() else torch.float64
    return RegistrationResult(
        pose=solved.pose.to(dtype),
        residual_px=solved.residual_px.to(dtype),
        iterations=solved.iterations,
        converged=solved.converged & (solved.reason == 0),
        degenerate=solved.reason != 0,
        reason=solved.reason,
        init_pose=solved.start,
    )


@dataclasses.dataclass(frozen=True)
class _Solved:
    """What a solver hands back to :func:`register` (float64)."""

    pose: Tensor
    start: Tensor
    residual_px: Tensor
    reason: Tensor
    iterations: Tensor
    converged: Tensor


def _solver(solver: Solver | str) -> Solver:
    try:
        return Solver(solver)
    except ValueError as error:
        raise PelmarkError(f"unknown solver {solver!r}; use one of {[s.value for s in Solver]}") from error


def _run_lm(
    problem: Problem,
    detached: tuple[Tensor, Tensor, Tensor],
    camera: Camera,
    init: Init | str | Tensor,
    settings: RegistrationSettings,
    needs_grad: bool,
) -> _Solved:
    """Start and solve to convergence on the host, without a graph; attach the implicit backward if needed.

    ``detached`` holds the problem's landmarks, weights and points detached from the graph. On a
    GPU the problem crosses to the host once and the solution comes back once.
    """
    device = problem.landmarks_px.device
    landmarks, weights, points = (host.to_host(x) for x in detached)
    kept, known = host.to_host(problem.keep), host.to_host(problem.reason)
    starts = starting_poses_host(init, landmarks, weights, points, camera)
    if isinstance(init, Tensor):  # any Rodrigues vector: LM starts from |r| ≤ π, the same rotation
        starts = host.wrap_rotation(starts[0])[None]
    state = solve_lm_host(landmarks, weights, points, starts, kept, camera, settings.lm, settings.min_depth_mm)
    found = solution_reason(state.depth_mm, weights, state.gauss_newton, state.pose, settings)
    # A solved sample had no bit before solving.
    reason = np.where(kept, found, known)
    keep = reason == 0
    solution = np.where(keep[:, None], state.pose, state.start)
    # Flagged samples return their start, which the solver never left unless it was flagged afterwards.
    visible_weights = host.to_host(problem.visible_weights)
    residual = _residual(landmarks, visible_weights, points, camera, solution, state.pixels, keep | ~kept, settings)
    pose = torch.from_numpy(solution).to(device)
    if needs_grad:
        inputs = (problem.landmarks_px, problem.weights, problem.points_world_mm)
        pose = ImplicitPose.apply(pose, *inputs, torch.from_numpy(keep).to(device), camera, settings.min_depth_mm)
    on_device = (state.start, residual, reason, state.iterations, state.converged)
    return _Solved(pose, *(torch.from_numpy(x).to(device) for x in on_device))


def _run_unrolled(
    kind: Solver,
    problem: Problem,
    camera: Camera,
    start: Tensor,
    settings: RegistrationSettings,
    needs_grad: bool,
) -> _Solved:
    """The paper's Adam or L-BFGS, then the same checks as LM and a stationarity test (on the host)."""
    objective = Objective(
        problem.landmarks_px, problem.weights, problem.points_world_mm, camera, settings.min_depth_mm
    )
    box = Box(settings.rotation_bound_rad, settings.translation_bound_mm)
    if kind is Solver.ADAM:
        pose = solve_adam(objective, start, box, settings.adam, needs_grad)
        iterations = torch.full_like(problem.reason, settings.adam.iterations)
    else:
        pose, iterations = solve_lbfgs(objective, start, box, settings.lbfgs, needs_grad)

    device = pose.device
    landmarks, weights, points, found_pose = (
        host.to_host(x) for x in (problem.landmarks_px, problem.weights, problem.points_world_mm, pose)
    )
    with np.errstate(all="ignore"):
        system, pixels, depth = host.evaluate(
            landmarks, host.weight_rows(weights), points, camera, found_pose, settings.min_depth_mm
        )
    gauss_newton = system[:, :6, :6]
    found = solution_reason(depth, weights, gauss_newton, found_pose, settings)
    reason = host.to_host(problem.reason) | np.where(host.to_host(problem.keep), found, 0)
    keep = reason == 0
    # Converged: one Gauss-Newton step from the result is negligible in every component.
    step, solved = host.solve_general(np.where(keep[:, None, None], gauss_newton, np.eye(6)), system[:, :6, 6])
    converged = keep & solved & (np.abs(step).max(-1) <= settings.converged_step)
    keep_t = torch.from_numpy(keep).to(device)
    pose = torch.where(keep_t[:, None], pose, start)
    visible_weights = host.to_host(problem.visible_weights)
    residual = _residual(landmarks, visible_weights, points, camera, host.to_host(pose), pixels, keep, settings)
    return _Solved(
        pose,
        start,
        torch.from_numpy(residual).to(device),
        torch.from_numpy(reason).to(device),
        iterations,
        torch.from_numpy(converged).to(device),
    )


def _residual(
    landmarks_px: np.ndarray,
    visible_weights: np.ndarray,
    points_world_mm: np.ndarray,
    camera: Camera,
    pose: np.ndarray,
    pixels: np.ndarray,
    at_pose: np.ndarray,
    settings: RegistrationSettings,
) -> np.ndarray:
    """(B,) RMS reprojection error at ``pose``; ``pixels`` are already its projection where ``at_pose``.

    On the host arrays the solver already holds (the problem's landmarks and points, detached).
    """
    if not at_pose.all():
        with np.errstate(all="ignore"):
            fresh, _, _ = project_host(points_world_mm, pose, camera, settings.min_depth_mm)
        pixels = np.where(at_pose[:, None, None], pixels, fresh)
    return host.rms_residual_px(pixels - landmarks_px, visible_weights)

"""The paper's unrolled optimisers: Adam and L-BFGS on paper eq. 4, differentiated through their iterations.

Both run in float64 on the batch at once (the cost is summed over samples, whose
gradients do not interact) and keep θ inside the box |r_j| ≤ rotation_bound,
|t_j| ≤ translation_bound with a clamp after every step (the paper clamps r to
[-2π, 2π]).

What is differentiable. When grad mode is on and the landmarks, weights or 3D
points require grad, every gradient ∇_θ E(θ_k) is taken with ``create_graph``,
so the returned pose is a differentiable function of the inputs through all
iterations, as in the paper's training. For L-BFGS the gradient flows through
every ∇E(θ_k) and every step θ_k + α_k d_k, with the inverse-Hessian estimate
H_k built from the (s, y) history treated as a constant preconditioner:
differentiating 1/(sᵀy) for pairs that shrink to rounding level near the
minimum makes the backward explode (1e21 in a 32-sample test), whereas with
H_k fixed a converged run's derivative tends to the implicit one,
-∇²E⁻¹ ∂∇E/∂x. The line search's choice of α (and a clamp that is active)
is piecewise constant and contributes no gradient. ``torch.optim.LBFGS`` cannot be used for this: it updates parameters
in place under ``no_grad``, so its result carries no gradient to the landmarks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pelmark.geometry import Camera, project
from pelmark.registration.objective import weighted_cost
from pelmark.registration.options import AdamSettings, LBFGSSettings
from pelmark.types import Landmarks2D, Landmarks3D, Pose, Weights


@dataclasses.dataclass(frozen=True)
class Box:
    """Per-component bounds of θ: r within ±rotation_rad, t within ±translation_mm."""

    rotation_rad: float
    translation_mm: float

    def clamp(self, pose: Pose) -> Pose:
        """θ clamped into the box (out of place; the gradient is 0 where a bound is active)."""
        rot, trans = self.rotation_rad, self.translation_mm
        return torch.cat([pose[..., :3].clamp(-rot, rot), pose[..., 3:].clamp(-trans, trans)], dim=-1)


@dataclasses.dataclass(frozen=True)
class Objective:
    """Paper eq. 4 for one batch, as a function of θ only."""

    landmarks_px: Landmarks2D
    weights: Weights
    points_world_mm: Landmarks3D
    camera: Camera
    min_depth_mm: float

    def __call__(self, pose: Pose) -> Tensor:
        """(B,) Σ_i w_i |π(p_i; θ) - l_i|²."""
        pixels = project(self.points_world_mm, pose, self.camera, self.min_depth_mm)
        return weighted_cost(pixels - self.landmarks_px, self.weights)

    def value_and_grad(self, pose: Pose, create_graph: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Cost (B,), its gradient (B, 6) and the pose they were taken at.

        Without ``create_graph`` the pose is detached first, so no graph is kept.
        """
        if not create_graph:
            pose = pose.detach()
        if not pose.requires_grad:
            pose = pose.requires_grad_(True)
        with torch.enable_grad():
            cost = self(pose)
            (grad,) = torch.autograd.grad(cost.sum(), pose, create_graph=create_graph)
        if not create_graph:
            return cost.detach(), grad, pose.detach()
        return cost, grad, pose


def solve_adam(objective: Objective, init_pose: Pose, box: Box, settings: AdamSettings, create_graph: bool) -> Pose:
    """``settings.iterations`` steps of Adam from ``init_pose`` (written out so it can be unrolled).

    Args:
        objective: the cost of the batch.
        init_pose: (B, 6) float64 starting poses (constants).
        box: bounds applied after every step.
        settings: learning rate, betas, eps.
        create_graph: keep the graph of every step for backpropagation.

    Returns:
        (B, 6) final poses.
    """
    pose = init_pose.detach().clone()
    first = torch.zeros_like(pose)
    second = torch.zeros_like(pose)
    for step in range(1, settings.iterations + 1):
        _, grad, pose = objective.value_and_grad(pose, create_graph)
        first = settings.beta1 * first + (1.0 - settings.beta1) * grad
        second = settings.beta2 * second + (1.0 - settings.beta2) * grad * grad
        first_hat = first / (1.0 - settings.beta1**step)
        second_hat = second / (1.0 - settings.beta2**step)
        # clamp_min keeps sqrt's derivative finite (zero) where the gradient is exactly 0.
        denominator = second_hat.clamp_min(1e-300).sqrt() + settings.eps
        pose = box.clamp(pose - settings.lr * first_hat / denominator)
    return pose if create_graph else pose.detach()


def solve_lbfgs(
    objective: Objective,
    init_pose: Pose,
    box: Box,
    settings: LBFGSSettings,
    create_graph: bool,
) -> tuple[Pose, Tensor]:
    """Batched L-BFGS with a backtracking Armijo line search, from ``init_pose``.

    Each sample has its own history and step size; a sample stops when no step
    size gives sufficient decrease, or its step or cost change falls below
    ``tolerance_change``. All step sizes 1, 1/2, 1/4, ... are evaluated in one
    batched call, so the line search costs one projection per iteration.

    Returns:
        (B, 6) final poses and (B,) iterations per sample.
    """
    batch = init_pose.shape[0]
    dtype, device = init_pose.dtype, init_pose.device
    cost, grad, pose = objective.value_and_grad(init_pose.detach().clone(), create_graph)
    history: list[tuple[Tensor, Tensor, Tensor]] = []
    gamma = torch.ones(batch, dtype=dtype, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    fractions = 0.5 ** torch.arange(settings.line_search_steps, dtype=dtype, device=device)

    for _ in range(settings.max_iterations):
        if not bool(active.any()):
            break
        # torch.optim.LBFGS's first step: steepest descent of l1 length at most 1.
        steepest = -grad / grad.abs().sum(-1, keepdim=True).clamp_min(1.0)
        direction = _two_loop(grad, history, gamma) if history else steepest
        slope = (grad * direction).sum(-1)
        direction = torch.where((slope < 0)[:, None], direction, steepest)
        slope = (grad * direction).sum(-1)

        alpha, found = _line_search(objective, pose, direction, cost, slope, fractions, box, settings.armijo)
        alpha = torch.where(active, alpha, torch.zeros_like(alpha))
        new_pose = box.clamp(pose + alpha[:, None] * direction)
        new_cost, new_grad, new_pose = objective.value_and_grad(new_pose, create_graph)

        # The curvature pairs enter as a constant preconditioner (see the module docstring).
        with torch.no_grad():
            s = new_pose - pose
            y = new_grad - grad
            curvature = (s * y).sum(-1)
            valid = active & found & (curvature > 1e-10 * s.norm(dim=-1) * y.norm(dim=-1))
            rho = torch.where(valid, 1.0 / torch.where(valid, curvature, 1.0), 0.0)
            gamma = torch.where(valid, curvature / torch.where(valid, (y * y).sum(-1), 1.0), gamma)
        history = (history + [(s, y, rho)])[-settings.history :]

        iterations = iterations + active.to(torch.int64)
        small_step = (alpha[:, None] * direction).abs().amax(-1) <= settings.tolerance_change
        small_change = (cost - new_cost).abs() <= settings.tolerance_change * cost.abs().clamp_min(1.0)
        active = active & found & ~small_step & ~small_change
        pose, cost, grad = new_pose, new_cost, new_grad
    return (pose if create_graph else pose.detach()), iterations


def _two_loop(grad: Tensor, history: list[tuple[Tensor, Tensor, Tensor]], gamma: Tensor) -> Tensor:
    """-H_k ∇E by the L-BFGS two-loop recursion, per sample (pairs with ρ = 0 are skipped)."""
    q = grad
    alphas = []
    for s, y, rho in reversed(history):
        a = rho * (s * q).sum(-1)
        q = q - a[:, None] * y
        alphas.append(a)
    r = gamma[:, None] * q
    for (s, y, rho), a in zip(history, reversed(alphas)):
        b = rho * (y * r).sum(-1)
        r = r + s * (a - b)[:, None]
    return -r


def _line_search(
    objective: Objective,
    pose: Tensor,
    direction: Tensor,
    cost: Tensor,
    slope: Tensor,
    fractions: Tensor,
    box: Box,
    armijo: float,
) -> tuple[Tensor, Tensor]:
    """Largest step 2^-j with E(θ + α d) ≤ E(θ) + c1 α ∇Eᵀd, all j evaluated at once.

    Returns:
        (B,) step sizes (0 where none qualifies) and (B,) whether one did.
    """
    count = fractions.shape[0]
    with torch.no_grad():
        start, step = pose.detach(), direction.detach()
        trials = box.clamp(start[None] + fractions[:, None, None] * step[None]).reshape(-1, 6)
        repeated = dataclasses.replace(
            objective,
            landmarks_px=objective.landmarks_px.detach().repeat(count, 1, 1),
            weights=objective.weights.detach().repeat(count, 1),
            points_world_mm=objective.points_world_mm.detach().repeat(count, 1, 1),
        )
        trial_cost = repeated(trials).reshape(count, -1)
        enough = trial_cost <= cost.detach()[None] + armijo * fractions[:, None] * slope.detach()[None]
        enough = enough & torch.isfinite(trial_cost)
        found = enough.any(0)
        first = enough.to(torch.int64).argmax(0)
        alpha = torch.where(found, fractions[first], torch.zeros_like(cost.detach()))
    return alpha, found

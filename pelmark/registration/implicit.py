"""Implicit differentiation of the registration solution, with an exact analytic Hessian.

At a solution θ*(x) of min_θ E(θ; x), x = (landmarks, weights, 3D points), the
first-order condition F(θ*, x) = ½ ∇_θ E = Jᵀ W e = 0 holds for all x near by,
so by the implicit function theorem

    dθ*/dx = -H⁻¹ ∂F/∂x,     H = ∂F/∂θ = JᵀWJ + Σ_i w_i Σ_k e_ik ∇²π_ik.

H is the *exact* Hessian of ½E, not the Gauss-Newton JᵀWJ: the second term
vanishes only when the residuals do, and a network's detections never fit
exactly, so JᵀWJ would give a biased gradient (gradcheck catches it). The
backward solves one 6x6 system per sample; nothing is backpropagated through
the solver's iterations.

Local chart. The Hessian is formed in the coordinates δ = (ω, τ) of the motion
R = exp([ω]×) R(r*), t = t* + τ, where second derivatives are short:

* the perspective division, u = fx X/Z: ∂²u/∂X∂Z = -fx/Z², ∂²u/∂Z² = 2 fx X/Z³
  (and the same for v), collected as M = Σ_k e_k ∇²_X π_k;
* the rotation, ∂²(exp([ω]×) q)_m/∂ω_a∂ω_b = ½(δ_ma q_b + δ_mb q_a) - q_m δ_ab,
  contracted with φ = (∂π/∂p')ᵀ e.

Since θ = (log(exp([ω]×) R(r*)), t* + τ) has ∂θ/∂δ = A = diag(J_l(r*)⁻¹, I),
and the Hessians of the two parameterisations agree up to a term proportional
to ∇E (zero at the solution), dθ*/dx = A dδ*/dx: the backward solves
H_δ u = Aᵀ ∂L/∂θ* and returns -uᵀ ∂F_δ/∂x, written out for landmarks, weights
and points in :func:`pelmark.registration.host.implicit_vjp`, which does the
arithmetic in NumPy on the host, as the solve does. The tests check all of it
against autograd through :func:`pelmark.geometry.project` and gradcheck.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pelmark.geometry import Camera
from pelmark.registration import host
from pelmark.registration.threads import small_problem_threads


class ImplicitPose(torch.autograd.Function):
    """Identity on the solution in the forward; -H⁻¹ ∂F/∂x in the backward.

    Forward args: ``solution`` (B, 6) float64 (no gradient of its own),
    ``landmarks_px`` (B, L, 2), ``weights`` (B, L), ``points_world_mm`` (B, L, 3),
    all float64, ``keep`` (B,) bool (samples with a trustworthy solution),
    ``camera``, ``min_depth_mm``. Samples not kept get exactly zero gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        solution: Tensor,
        landmarks_px: Tensor,
        weights: Tensor,
        points_world_mm: Tensor,
        keep: Tensor,
        camera: Camera,
        min_depth_mm: float,
    ) -> Tensor:
        ctx.save_for_backward(solution, landmarks_px, weights, points_world_mm, keep)
        ctx.camera = camera
        ctx.min_depth_mm = min_depth_mm
        return solution.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_pose: Tensor) -> tuple[Tensor | None, ...]:
        solution, landmarks_px, weights, points_world_mm, keep = ctx.saved_tensors
        device = solution.device
        # The arithmetic runs in NumPy on the host, as the solve did (see registration.host).
        arrays = [host.to_host(x) for x in (grad_pose, solution, landmarks_px, weights, points_world_mm, keep)]
        wanted = tuple(ctx.needs_input_grad[1:4])
        with small_problem_threads(torch.device("cpu"), weights.numel()), np.errstate(all="ignore"):
            grads = host.implicit_vjp(*arrays, ctx.camera, ctx.min_depth_mm, wanted=wanted)
        # Fresh tensors: autograd may keep one as a leaf's .grad and add to it in place.
        return (None, *(None if grad is None else torch.from_numpy(grad).to(device) for grad in grads), None, None, None)

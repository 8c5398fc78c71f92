"""The registration cost (paper eq. 4).

The cost of a pose θ is the weighted sum of squared reprojection errors

    E(θ) = Σ_i w_i |π(p_i; θ) - l_i|²,

with π :func:`pelmark.geometry.project` (Rodrigues eqs. 5-6, clamped perspective
division eqs. 7-8). The paper's unrolled solvers differentiate it through
autograd; the LM solver's Jacobian, normal equations and exact Hessian are in
:mod:`pelmark.registration.host`.
"""

from __future__ import annotations

from torch import Tensor

from pelmark.types import Weights


def weighted_cost(residual_px: Tensor, weights: Weights) -> Tensor:
    """Paper eq. 4 per sample: Σ_i w_i |e_i|², shape (B,)."""
    return (weights * residual_px.square().sum(-1)).sum(-1)

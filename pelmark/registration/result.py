"""What a registration returns."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from pelmark.registration.options import Degeneracy
from pelmark.types import Pose


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """Poses and per-sample diagnostics of one batched registration.

    Attributes:
        pose: (B, 6) θ = (r rad, t mm) in the dtype of ``landmarks_px``;
            differentiable with respect to the landmarks, weights and 3D points
            (LM: implicit differentiation; adam/lbfgs: through the iterations).
            Degenerate samples hold their initial pose and get zero gradient.
        residual_px: (B,) weighted RMS reprojection error at ``pose``,
            ``sqrt(Σ w |π(θ) - l|² / Σ w)``, detached; 0 where all weights are 0.
        iterations: (B,) iterations each sample ran.
        converged: (B,) whether the solver's stopping rule was met (never for
            degenerate samples).
        degenerate: (B,) whether the pose cannot be trusted (see ``reason``).
        reason: (B,) integer bit flags of :class:`Degeneracy`.
        init_pose: (B, 6) float64 pose each solve started from.
    """

    pose: Pose
    residual_px: Tensor
    iterations: Tensor
    converged: Tensor
    degenerate: Tensor
    reason: Tensor
    init_pose: Tensor

    def reasons(self, index: int) -> Degeneracy:
        """The :class:`Degeneracy` flags of sample ``index``, for messages and logs."""
        return Degeneracy(int(self.reason[index]))


@dataclasses.dataclass(frozen=True)
class RobustResult:
    """A RANSAC registration: the refined result and which landmarks it kept.

    Attributes:
        result: the LM refinement on the inliers (gradients flow as for ``register``).
        inliers: (B, L) the landmarks the final refinement used: visible ones
            within the threshold of the best hypothesis, re-selected from the
            refined pose until stable (at most ``refinement_rounds`` times).
        hypotheses: number of subsets tried per sample.
    """

    result: RegistrationResult
    inliers: Tensor
    hypotheses: int

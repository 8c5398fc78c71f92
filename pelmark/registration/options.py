"""Names and settings of the registration layer: which solver, which start, how tight.

Everything a solve depends on lives in one frozen :class:`RegistrationSettings`,
so a training run can store it beside its checkpoint.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from pelmark.geometry import DEFAULT_MIN_DEPTH_MM


class Solver(str, enum.Enum):
    """How the pose is found.

    ``LM`` is Levenberg-Marquardt to convergence with an implicit backward;
    ``ADAM`` and ``LBFGS`` are the paper's unrolled optimisers, differentiated
    by backpropagation through their iterations.
    """

    LM = "lm"
    ADAM = "adam"
    LBFGS = "lbfgs"


class Init(str, enum.Enum):
    """Where a solve starts when no pose tensor is given.

    ``IDENTITY`` is θ = 0, the nominal AP view (the paper's start);
    ``CLOSED_FORM`` is a direct linear transform on the calibrated rays.
    """

    IDENTITY = "identity"
    CLOSED_FORM = "closed_form"


class Degeneracy(enum.IntFlag):
    """Why a sample's pose cannot be trusted; ``RegistrationResult.reason`` holds these bits."""

    NONE = 0
    FEW_VISIBLE = 1  # fewer than ``min_visible`` landmarks with weight > 0
    COLLINEAR = 2  # the visible 3D points lie on a line: rotation about it is unobservable
    BEHIND_SOURCE = 4  # a visible point is at or behind the source at the solution (depth clamp active)
    SINGULAR = 8  # the Jacobi-scaled normal equations are singular at the solution
    NON_FINITE = 16  # non-finite input for a visible landmark, or a non-finite solution


@dataclasses.dataclass(frozen=True)
class LMSettings:
    """Levenberg-Marquardt stopping rules (float64).

    Attributes:
        max_iterations: hard cap on iterations per sample.
        step_tolerance: stop with a step ``||δ|| <= tol * (||θ|| + tol)``. With the
            default cost tolerance this leaves the pose within ~1e-7 (rad, mm)
            of the minimum after 3-4 iterations from the closed form, far below
            anything training or evaluation can see; finite-difference checks
            of the solution want ~1e-13.
        cost_tolerance: stop with a step for which the linear model predicts a
            cost decrease below this fraction of the cost. Such a final step is
            taken without evaluating it; other steps are accepted when the cost
            does not rise beyond its rounding error, so the last steps to the
            minimum are not lost to rounding.
        initial_damping: λ relative to the diagonal of JᵀWJ (Marquardt scaling).
        max_damping: give up on a sample whose λ grows past this (no descent left).
        singular_tolerance: smallest eigenvalue of the Jacobi-scaled JᵀWJ below
            which the solution is flagged ``SINGULAR``.
    """

    max_iterations: int = 50
    step_tolerance: float = 1e-7
    cost_tolerance: float = 1e-10
    initial_damping: float = 1e-3
    max_damping: float = 1e12
    singular_tolerance: float = 1e-10


@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """The paper's unrolled Adam: 100 iterations at lr 1e-3 from the identity."""

    iterations: int = 100
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class LBFGSSettings:
    """Unrolled L-BFGS with a batched backtracking (Armijo) line search.

    Attributes:
        max_iterations: iterations (each one gradient and one batched line search).
        history: number of (s, y) pairs kept, as ``torch.optim.LBFGS``'s ``history_size``.
        line_search_steps: step sizes tried per iteration, 1, 1/2, 1/4, ...
        armijo: sufficient-decrease constant c1.
        tolerance_change: a sample stops when its step or its cost change falls
            below this (relative), as ``torch.optim.LBFGS``'s ``tolerance_change``.
    """

    max_iterations: int = 100
    history: int = 10
    line_search_steps: int = 24
    armijo: float = 1e-4
    tolerance_change: float = 1e-12


@dataclasses.dataclass(frozen=True)
class RegistrationSettings:
    """All knobs of :func:`pelmark.registration.register`.

    Attributes:
        lm: Levenberg-Marquardt stopping rules.
        adam: the unrolled Adam's schedule.
        lbfgs: the unrolled L-BFGS's schedule.
        min_depth_mm: depth clamp before the perspective division (paper eqs. 7-8).
        rotation_bound_rad: unrolled solvers clamp each component of r to ±this
            (the paper: 2π). LM instead wraps |r| to at most π, which changes no rotation.
        translation_bound_mm: unrolled solvers clamp each component of t to ±this.
        min_visible: fewer landmarks with weight > 0 than this is ``FEW_VISIBLE``.
            Four is the least for which P3P's ambiguity is resolved.
        collinear_tolerance: ratio of the second to the first singular value of
            the centred visible points below which they count as ``COLLINEAR``.
        converged_step: an unrolled solve counts as converged when one
            Gauss-Newton step from its result is below this in every component
            (rad and mm): the result is then a stationary point to that precision.
    """

    lm: LMSettings = LMSettings()
    adam: AdamSettings = AdamSettings()
    lbfgs: LBFGSSettings = LBFGSSettings()
    min_depth_mm: float = DEFAULT_MIN_DEPTH_MM
    rotation_bound_rad: float = 2.0 * math.pi
    translation_bound_mm: float = 500.0
    min_visible: int = 4
    collinear_tolerance: float = 1e-6
    converged_step: float = 1e-6

"""Input validation and the degeneracy tests run before and after a solve.

Bad *arguments* (wrong shapes, negative weights) raise :class:`PelmarkError`.
Bad *samples* (too few visible landmarks, collinear points, NaN detections,
points behind the source) are flagged per sample so one of them never stops
a training batch.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.registration import host
from pelmark.registration.options import Degeneracy, RegistrationSettings
from pelmark.types import Landmarks2D, Landmarks3D, Weights


@dataclasses.dataclass(frozen=True)
class Problem:
    """A validated batch in float64, safe to compute on.

    Attributes:
        landmarks_px: (B, L, 2); non-finite entries are 0.
        weights: (B, L) weights to solve with; non-finite entries and all of a
            flagged sample's are 0, so they cannot produce NaN anywhere, not even
            in a backward pass.
        visible_weights: (B, L) the finite weights of every sample, flagged or
            not, for reporting residuals.
        points_world_mm: (B, L, 3); non-finite entries are 0.
        reason: (B,) int64 :class:`Degeneracy` bits known before solving.
        keep: (B,) True for samples that are solved (no bit in ``reason``).
    """

    landmarks_px: Tensor
    weights: Tensor
    visible_weights: Tensor
    points_world_mm: Tensor
    reason: Tensor
    keep: Tensor


def validate(landmarks_px: Landmarks2D, weights: Weights, points_world_mm: Landmarks3D) -> tuple[Landmarks3D, bool]:
    """Check shapes and signs; return the 3D points broadcast to (B, L, 3) and whether every entry is finite.

    The sign test and the finiteness test share one read of the device. A NaN or an
    infinity anywhere makes the total of all entries non-finite; an overflow of the
    total only reports a finite batch as not finite, which is handled all the same.

    Raises:
        PelmarkError: on a shape mismatch or a negative weight.
    """
    if landmarks_px.ndim != 3 or landmarks_px.shape[-1] != 2:
        raise PelmarkError(f"landmarks_px must have shape (B, L, 2), got {tuple(landmarks_px.shape)}")
    batch, count, _ = landmarks_px.shape
    if tuple(weights.shape) != (batch, count):
        raise PelmarkError(f"weights must have shape ({batch}, {count}), got {tuple(weights.shape)}")
    if points_world_mm.ndim == 2:
        points_world_mm = points_world_mm.expand(batch, *points_world_mm.shape)
    if tuple(points_world_mm.shape) != (batch, count, 3):
        raise PelmarkError(
            f"points_world_mm must have shape ({batch}, {count}, 3) or ({count}, 3), got {tuple(points_world_mm.shape)}"
        )
    total = landmarks_px.detach().sum() + weights.detach().sum() + points_world_mm.detach().sum()
    negative, finite = torch.stack([(weights < 0).any(), torch.isfinite(total)]).tolist()
    if negative:
        raise PelmarkError("weights must be >= 0 (0 marks a landmark that is not visible)")
    return points_world_mm, finite


def prepare(
    landmarks_px: Landmarks2D,
    weights: Weights,
    points_world_mm: Landmarks3D,
    settings: RegistrationSettings,
) -> Problem:
    """Validate, cast to float64, neutralise non-finite entries and flag degenerate samples.

    The returned tensors stay connected to the caller's for autograd (only
    out-of-place ``where``/``to``), and the caller's tensors are never modified.
    """
    points_world_mm, finite = validate(landmarks_px, weights, points_world_mm)
    f64 = torch.float64
    landmarks = landmarks_px.to(f64)
    w = weights.to(f64)
    points = points_world_mm.to(f64)
    zero = torch.zeros((), dtype=f64, device=landmarks.device)

    if finite:  # nothing to neutralise: the same problem as below, in fewer kernels
        usable = w > 0
        flags = []
    else:
        finite_weight = torch.isfinite(w)
        visible = (w > 0) & finite_weight
        finite_landmarks, finite_points = torch.isfinite(landmarks), torch.isfinite(points)
        finite_entry = finite_landmarks.all(-1) & finite_points.all(-1)
        bad_entry = ~finite_weight | (visible & ~finite_entry)
        usable = visible & finite_entry  # visible and not bad
        # Invisible landmarks keep finite coordinates: d(pose)/d(weight) at weight 0 needs them.
        landmarks = torch.where(finite_landmarks, landmarks, zero)
        points = torch.where(finite_points, points, zero)
        flags = [(bad_entry.any(-1), Degeneracy.NON_FINITE)]

    reason = _union_of_flags(
        *flags,
        (usable.sum(-1) < settings.min_visible, Degeneracy.FEW_VISIBLE),
        (_collinear(points, usable, settings.collinear_tolerance), Degeneracy.COLLINEAR),
    )
    keep = reason == 0
    visible_weights = torch.where(usable, w, zero)
    # Zero weights pass through (not replaced by a constant): d(pose)/d(weight) at 0 is meaningful.
    solve_with = keep.unsqueeze(-1) if finite else ~bad_entry & keep.unsqueeze(-1)
    w = torch.where(solve_with, w, zero)
    return Problem(
        landmarks_px=landmarks,
        weights=w,
        visible_weights=visible_weights,
        points_world_mm=points,
        reason=reason,
        keep=keep,
    )


def _union_of_flags(*flags: tuple[Tensor, Degeneracy]) -> Tensor:
    """(B,) int64 :class:`Degeneracy` bits from (B,) bool masks, each with its flag.

    The flags are distinct bits, so their sum is their union: one product of the stacked masks
    with the flags' values and one sum instead of a product and a sum per flag.
    """
    masks, bits = zip(*flags)
    return (torch.stack(masks, dim=-1) * _flag_values(bits, masks[0].device)).sum(-1)


@functools.lru_cache(maxsize=32)
def _flag_values(bits: tuple[Degeneracy, ...], device: torch.device) -> Tensor:
    # An ordinary tensor even when first asked for under inference mode.
    with torch.inference_mode(False):
        return torch.tensor([int(bit) for bit in bits], device=device)


def _collinear(points: Tensor, visible: Tensor, tolerance: float) -> Tensor:
    """(B,) True where the visible points span no more than a line (or a point).

    With λ1 ≥ λ2 ≥ λ3 the eigenvalues of the scatter matrix S, the points are
    collinear when λ2/λ1 ≤ tol² (tol: a ratio of singular values). The second
    invariant I2 = ½(tr(S)² - tr(S²)) = λ1λ2 + λ1λ3 + λ2λ3 lies in [λ1λ2, 3λ1λ2]
    and tr(S) in [λ1, 3λ1], which gives the test without an eigen-decomposition.
    """
    mask = visible.to(points.dtype).unsqueeze(-1)
    count = mask.sum(-2, keepdim=True).clamp_min(1.0)
    centred = (points - (points * mask).sum(-2, keepdim=True) / count) * mask
    scatter = torch.bmm(centred.transpose(-1, -2), centred)
    trace2 = scatter.diagonal(dim1=-2, dim2=-1).sum(-1).square()
    # I2 = ½(tr(S)² - tr(S²)) ≤ (tol tr(S))² rearranged, with tr(S²) the sum of the squared entries.
    return (1.0 - 2.0 * tolerance**2) * trace2 <= scatter.square().sum((-2, -1))


def solution_reason(
    depth_mm: np.ndarray,
    weights: np.ndarray,
    gauss_newton: np.ndarray,
    pose: np.ndarray,
    settings: RegistrationSettings,
) -> np.ndarray:
    """Degeneracy bits found at a solution: points behind the source, singular normal equations, NaN.

    On host arrays, as the solve that found the solution (:mod:`pelmark.registration.host`).

    Args:
        depth_mm: (B, L) unclamped depths at the solution.
        weights: (B, L) float64 weights (0 for flagged samples).
        gauss_newton: (B, 6, 6) JᵀWJ at the solution.
        pose: (B, 6) the solution.
        settings: tolerances.

    Returns:
        (B,) int64 :class:`Degeneracy` bits.
    """
    visible = weights > 0
    behind = (visible & (depth_mm <= settings.min_depth_mm)).any(-1)
    # Jacobi scaling makes the test free of the rad/mm units of θ; the scaled
    # matrix minus tol·I has a Cholesky factor iff its smallest eigenvalue > tol.
    diag = np.diagonal(gauss_newton, axis1=1, axis2=2)
    tiny = np.finfo(np.float64).tiny
    inv_sqrt = 1.0 / np.sqrt(np.maximum(diag, tiny))
    with np.errstate(all="ignore"):
        scaled = gauss_newton * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)  # a fresh array
    scaled[:, range(6), range(6)] -= settings.lm.singular_tolerance
    no_signal = diag.min(-1) <= settings.lm.singular_tolerance * np.maximum(diag.max(-1), tiny)
    singular = ~host.is_definite(scaled) | no_signal
    non_finite = ~np.isfinite(pose).all(-1)
    # The flags are distinct bits, so their sum is their union.
    bits = (behind, Degeneracy.BEHIND_SOURCE), (singular, Degeneracy.SINGULAR), (non_finite, Degeneracy.NON_FINITE)
    return sum(mask.astype(np.int64) * int(bit) for mask, bit in bits)

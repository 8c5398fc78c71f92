"""The training losses: BCE on the landmark masks and the Pose Estimation Loss (PEL, paper eqs. 1-10).

PEL for a batch:
    1. soft-argmax (eqs. 1-2) turns each heatmap into a 2D point at the
       sample's model resolution;
    2. the points move into one reference camera: the store's detector resized
       to the model size. A crop and resize change only the intrinsics (the same
       rays), so the map is exact, and one camera serves the whole batch;
    3. :func:`pelmark.registration.register` solves the 6-DoF pose against the
       CT's 3D landmarks, weighting invisible landmarks 0;
    4. the pose loss (paper eq. 10 by default) compares it with the true pose.

Samples whose registration is degenerate (fewer than the needed visible
landmarks, a singular system, the source behind the anatomy) are left out of
the mean; their count is reported.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from pelmark.geometry import Camera
from pelmark.registration import PoseLoss, Solver, pose_errors, pose_loss, register
from pelmark.train.model import heatmap_diagnostics, local_soft_argmax, soft_argmax


def segmentation_loss(logits: Tensor, targets: Tensor, pos_weight: float = 1.0) -> Tensor:
    """The paper's BCEWithLogitsLoss between the heatmap logits and the masks (mean over all pixels).

    ``pos_weight`` > 1 weighs the mask pixels up (1 = the paper's plain BCE).
    """
    weight = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight)


def spatial_softmax_loss(logits: Tensor, targets: Tensor, visible: Tensor) -> Tensor:
    """Cross-entropy between each heatmap's softmax over its pixels and its target, normalised to sum 1.

    Each landmark becomes an S²-way classification of where it lies, so the
    gradient points at the true location however small the target is, unlike
    BCE, whose positive pixels are a few dozen among S² (for a Gaussian
    target this is the KL divergence of seed 003_* up to the target's
    constant entropy). It also trains the softmax that the soft-argmax of PEL
    reads to concentrate on the landmark. Invisible landmarks (empty targets)
    weigh 0.

    Args:
        logits: (B, L, H, W).
        targets: (B, L, H, W) non-negative targets (disk or Gaussian).
        visible: (B, L) bool.

    Returns:
        Scalar mean over the visible landmarks (0 with a zero gradient if none).
    """
    batch, landmarks = logits.shape[:2]
    log_p = torch.log_softmax(logits.float().reshape(batch, landmarks, -1), dim=-1)
    target = targets.float().reshape(batch, landmarks, -1)
    mass = target.sum(-1)
    use = visible.to(logits.device, torch.bool) & (mass > 0)
    if not bool(use.any()):
        return logits.sum() * 0.0
    q = target[use] / mass[use][:, None]
    return -(q * log_p[use]).sum(-1).mean()


def to_reference_pixels(points_px: Tensor, intrinsics: Tensor, reference: Camera) -> Tensor:
    """Move (B, L, 2) points from each sample's camera (``intrinsics`` rows: fx, fy, cx, cy, ...) into ``reference``."""
    intrinsics = intrinsics.to(points_px.device, torch.float64)
    points = points_px.to(torch.float64)
    fx, fy, cx, cy = (intrinsics[:, i, None] for i in range(4))
    x = (points[..., 0] - cx) / fx * reference.fx + reference.cx_px
    y = (points[..., 1] - cy) / fy * reference.fy + reference.cy_px
    return torch.stack([x, y], dim=-1)


@dataclasses.dataclass(frozen=True)
class PelTerm:
    """PEL of a batch and what the registration did.

    Attributes:
        loss: scalar, differentiable (0 with a zero gradient if every sample was degenerate).
        n_used: samples that entered the mean.
        rotation_deg, translation_mm: mean pose errors of the used samples (NaN if none).
        diagnostics: how the registered points relate to the hard argmax (see
            :func:`~pelmark.train.model.heatmap_diagnostics`).
    """

    loss: Tensor
    n_used: int
    rotation_deg: float
    translation_mm: float
    diagnostics: dict[str, float] = dataclasses.field(default_factory=dict)


def pel_term(
    logits: Tensor,
    visible: Tensor,
    intrinsics: Tensor,
    landmarks_3d: Tensor,
    pose_true: Tensor,
    reference: Camera,
    temperature: float,
    kind: PoseLoss = PoseLoss.PAPER,
    solver: Solver = Solver.LM,
    window_radius: int | None = None,
) -> PelTerm:
    """PEL for (B, L, S, S) logits; see the module docstring.

    ``window_radius`` None takes the paper's soft-argmax over the whole heatmap;
    an integer restricts it to that window around the hard argmax.
    """
    if window_radius is None:
        points_model = soft_argmax(logits, temperature)
    else:
        points_model = local_soft_argmax(logits, window_radius, temperature)
    diagnostics = heatmap_diagnostics(logits, points_model, visible, temperature)
    points = to_reference_pixels(points_model, intrinsics, reference)
    weights = visible.to(points.device, torch.float64)
    landmarks_3d = landmarks_3d.to(points.device, torch.float64)
    pose_true = pose_true.to(points.device, torch.float64)
    result = register(points, weights, landmarks_3d, reference, solver=solver)
    used = ~result.degenerate
    n_used = int(used.sum())
    if n_used == 0:
        return PelTerm(logits.sum() * 0.0, 0, float("nan"), float("nan"), diagnostics)
    pose = result.pose[used]
    loss = pose_loss(kind, pose, pose_true[used], landmarks_3d[used], reference)
    with torch.no_grad():
        rotation, translation = pose_errors(pose.detach(), pose_true[used])
    return PelTerm(loss.float(), n_used, float(rotation.mean()), float(translation.mean()), diagnostics)

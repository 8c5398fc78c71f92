"""The segmentation-informed landmark model of seed 003 (Hresko & Drotar): network, losses and visibility.

Network
    One encoder (any smp encoder: ``resnet18``... or timm's HRNet as
    ``tu-hrnet_w18``, the paper's, random weights, offline) feeds two U-Net
    decoders: one ends in the L landmark heatmaps, the other in C + 1
    segmentation logits (background and the cohort's C bone classes). The
    forward pass returns both as one (B, L + C + 1, H, W) tensor, heatmaps
    first (:func:`split_outputs`), so that the training loop, DDP and
    evaluation pass one tensor around as for the plain U-Net.
Losses (seed 003, section 2.2), weights ``seg_weight`` 1, ``kl_weight`` 0.1, ``visibility_weight`` 10
    * Dice + cross-entropy of the segmentation (:func:`dice_ce_loss`).
    * KL divergence between each visible landmark's heatmap softmax and its
      Gaussian target normalised to sum 1 (:func:`kl_heatmap_loss`).
    * The visibility loss (:func:`visibility_loss`): a weighted mean absolute
      error between the predicted visibility v̂ and the truth v ∈ {0, 1}, with
      weight 2 where v = 0 (false positives cost double).
Visibility
    The paper's v̂ is 0 for a landmark the model does not find, 0.5 for one
    found outside its bone's predicted region and 1 inside it. A landmark is
    found when the sigmoid of its heatmap's peak reaches 0.5 (the paper reads
    landmarks as ``argmax sigmoid(H)``), and it is inside when the predicted
    class at its argmax pixel is one of its bones (``LANDMARK_BONES`` of
    :mod:`pelmark.landmark_sets`). That v̂ is a step function, with no gradient,
    so training uses its smooth counterpart
    ``v̂ = p · (1 + q) / 2``, ``p = sigmoid(max H)`` and ``q`` the softmax(H)-weighted
    probability that the segmentation puts on the landmark's bones; it equals
    the discrete v̂ when p, q ∈ {0, 1}. The predicted visibility that evaluation
    reports is the discrete one: a landmark with v̂ = 0 is reported absent, and
    ``pelmark eval`` chooses on each run's validation images whether v̂ = 0.5 (a
    peak off its bone) counts as present (:mod:`pelmark.evaluate.visibility`).
Canvas margin (``canvas_margin_px``, off by default)
    A heatmap's argmax cannot leave the image, so a plain model cannot tell a
    landmark 2 px outside the image from one 2 px inside; at the demo's poses
    70-82 % of seg-informed's visibility errors lie within 10 px of the border.
    With a margin of m model px the network pads its input by m pixels of
    :data:`PAD_VALUE` on every side (inside ``forward``, so an ONNX export
    carries it) and predicts on that canvas: the heatmaps' targets follow every
    landmark that projects onto the canvas, and the segmentation is trained and
    read on the image only. A landmark whose heatmap peaks in the margin is
    reported absent (v̂ = 0), and the smooth v̂ becomes
    ``p · (s + q) / 2`` with ``s`` the softmax(H) mass inside the image
    (``s`` = 1 without a margin). Consumers read the margin off the output's
    size (:func:`canvas_margin`) and subtract it from the argmax
    (:func:`image_argmax`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pelmark.geometry import on_pixel_grid
from pelmark.train.model import hard_argmax

# The paper's loss weights (seed 003, section 2.4).
SEG_WEIGHT = 1.0
KL_WEIGHT = 0.1
VISIBILITY_WEIGHT = 10.0
# Weight of a landmark that is not in the image, in the visibility loss (the paper's false-positive weight).
ABSENT_WEIGHT = 2.0
# A landmark is present when the sigmoid of its heatmap's peak reaches this (as evaluate.predict's "found").
PRESENT_PROBABILITY = 0.5
# What the canvas margin around the image holds: below the [0, 1] of every normalised image, so that the network
# sees where the image ends (zero would read as air, and a bone cut by the border as a bone that ends there).
PAD_VALUE = -1.0


class SegInformedNet(nn.Module):
    """A shared encoder with a landmark decoder and a segmentation decoder (see the module docstring).

    Args:
        landmark_net: an smp U-Net with one output per landmark; its encoder is the shared one.
        segmentation_net: an smp U-Net of the same encoder with C + 1 outputs; only its decoder and
            head are kept.
    """

    def __init__(self, landmark_net: nn.Module, segmentation_net: nn.Module, margin: int = 0):
        super().__init__()
        self.margin = int(margin)
        self.encoder = landmark_net.encoder
        self.decoder = landmark_net.decoder
        self.segmentation_head = landmark_net.segmentation_head
        self.seg_decoder = segmentation_net.decoder
        self.seg_head = segmentation_net.segmentation_head
        self._check_input_shape = landmark_net.check_input_shape

    def forward(self, x: Tensor) -> Tensor:
        if self.margin:
            x = F.pad(x, (self.margin,) * 4, value=PAD_VALUE)
        self._check_input_shape(x)
        features = self.encoder(x)
        heatmaps = self.segmentation_head(self.decoder(features))
        segmentation = self.seg_head(self.seg_decoder(features))
        return torch.cat([heatmaps, segmentation], dim=1)


def split_outputs(outputs: Tensor, n_landmarks: int, margin: int = 0) -> tuple[Tensor, Tensor | None]:
    """(heatmap logits (B, L, H + 2m, W + 2m) on the canvas, segmentation logits (B, C + 1, H, W) on the image
    or None for a plain heatmap model), ``margin`` m from :func:`canvas_margin`."""
    if outputs.shape[1] == n_landmarks:
        return outputs, None
    return outputs[:, :n_landmarks], crop_margin(outputs[:, n_landmarks:], margin)


def canvas_margin(outputs: Tensor, image_size: tuple[int, int] | torch.Size) -> int:
    """The margin m of outputs (..., H + 2m, W + 2m) over an image of ``image_size`` (H, W); 0 for outputs of its size.

    Raises:
        ValueError: the outputs are smaller than the image, or do not extend it by the same whole margin on every side.
    """
    height, width = (int(v) for v in tuple(image_size)[-2:])
    extra_h, extra_w = outputs.shape[-2] - height, outputs.shape[-1] - width
    if extra_h != extra_w or extra_h < 0 or extra_h % 2:
        raise ValueError(f"outputs of size {tuple(outputs.shape[-2:])} are not a canvas around an image of {(height, width)}")
    return extra_h // 2


def crop_margin(maps: Tensor, margin: int) -> Tensor:
    """The image region of canvas maps (..., H + 2m, W + 2m)."""
    if margin == 0:
        return maps
    return maps[..., margin:-margin, margin:-margin]


def image_argmax(heatmap_logits: Tensor, margin: int = 0) -> Tensor:
    """(B, L, 2) each canvas heatmap's argmax (x, y) in image pixels: it lies outside the image when it peaks in the margin."""
    points = hard_argmax(heatmap_logits)
    return points - margin if margin else points


# ---------------------------------------------------------------- targets


def gaussian_targets(landmarks_px: Tensor, visible: Tensor, height: int, width: int, sigma_px: float) -> Tensor:
    """(B, L, H, W) exp(-d²/2σ²) at each pixel centre, zero for invisible landmarks (on the landmarks' device)."""
    rows = torch.arange(height, dtype=torch.float32, device=landmarks_px.device)
    cols = torch.arange(width, dtype=torch.float32, device=landmarks_px.device)
    points = torch.nan_to_num(landmarks_px.float())
    dy = (rows[None, None, :] - points[..., 1, None]).square()  # (B, L, H)
    dx = (cols[None, None, :] - points[..., 0, None]).square()  # (B, L, W)
    maps = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2.0 * sigma_px**2))
    return maps * visible.to(maps.device, maps.dtype)[..., None, None]


# ---------------------------------------------------------------- losses


def dice_ce_loss(seg_logits: Tensor, labels: Tensor, smooth: float = 1.0) -> tuple[Tensor, Tensor]:
    """(soft Dice loss, cross-entropy) of (B, K, H, W) logits against (B, H, W) class values 0..K-1.

    Dice is computed per class over the whole batch, background included,
    ``d_k = (2 Σ p_k y_k + s) / (Σ p_k + Σ y_k + s)`` with ``p = softmax(logits)``, and the
    loss is ``1 - mean_k d_k``; a class absent from both target and prediction has ``d_k`` = 1.
    The cross-entropy is the mean over pixels.
    """
    logits = seg_logits.float()
    target = labels.to(logits.device, torch.long)
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probabilities.dtype)
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - dice.mean(), F.cross_entropy(logits, target)


def kl_heatmap_loss(heatmap_logits: Tensor, targets: Tensor, visible: Tensor) -> Tensor:
    """KL(target ‖ softmax(heatmap)) per visible landmark, summed over pixels, averaged over the visible landmarks.

    The target is normalised to sum 1. Landmarks not visible (or with an empty target) weigh 0;
    with none, the loss is 0 with a zero gradient.
    """
    batch, landmarks = heatmap_logits.shape[:2]
    log_p = torch.log_softmax(heatmap_logits.float().reshape(batch, landmarks, -1), dim=-1)
    target = targets.float().to(log_p.device).reshape(batch, landmarks, -1)
    mass = target.sum(-1)
    use = visible.to(log_p.device, torch.bool) & (mass > 0)
    if not bool(use.any()):
        return heatmap_logits.sum() * 0.0
    q = target[use] / mass[use][:, None]
    return (torch.xlogy(q, q) - q * log_p[use]).sum(-1).mean()


def _image_softmax(heatmap_logits: Tensor, margin: int) -> Tensor:
    """(B, L, P) each landmark's softmax over the canvas, at the P pixels of the image only."""
    batch, landmarks = heatmap_logits.shape[:2]
    where = torch.softmax(heatmap_logits.float().reshape(batch, landmarks, -1), dim=-1)
    return crop_margin(where.reshape(heatmap_logits.shape), margin).reshape(batch, landmarks, -1)


def _bone_mass(where: Tensor, seg_logits: Tensor, bones: Tensor) -> Tensor:
    """(B, L) the mass of ``where`` (B, L, P, on the image's P pixels) that the segmentation gives each landmark's bones."""
    classes = torch.softmax(seg_logits.float(), dim=1).reshape(seg_logits.shape[0], seg_logits.shape[1], -1)
    on_bone = torch.einsum("lk,bkp->blp", bones.to(classes.device, classes.dtype), classes)  # (B, L, P)
    return (where * on_bone).sum(-1)


def bone_probability(heatmap_logits: Tensor, seg_logits: Tensor, bones: Tensor) -> Tensor:
    """(B, L): the softmax(heatmap)-weighted probability that the segmentation gives each landmark's bones.

    Args:
        heatmap_logits: (B, L, H + 2m, W + 2m), on the canvas (m = 0: the image).
        seg_logits: (B, K, H, W), K = C + 1 classes (0 = background), on the image: the margin has no bone.
        bones: (L, K) bool, ``bones[l, k]``: class value k is a bone of landmark l.
    """
    where = _image_softmax(heatmap_logits, canvas_margin(heatmap_logits, seg_logits.shape))
    return _bone_mass(where, seg_logits, bones)


def soft_visibility(heatmap_logits: Tensor, seg_logits: Tensor, bones: Tensor) -> Tensor:
    """(B, L) smooth predicted visibility ``p (s + q) / 2`` (see the module docstring; s = 1 without a margin)."""
    present = torch.sigmoid(heatmap_logits.float().flatten(2).amax(-1))
    margin = canvas_margin(heatmap_logits, seg_logits.shape)
    where = _image_softmax(heatmap_logits, margin)
    inside = where.sum(-1) if margin else 1.0
    return present * (inside + _bone_mass(where, seg_logits, bones)) / 2.0


def visibility_loss(predicted: Tensor, visible: Tensor, absent_weight: float = ABSENT_WEIGHT) -> Tensor:
    """Seed 003's weighted MAE: mean over images and landmarks of ``w |v̂ - v|``, w = ``absent_weight`` where v = 0."""
    truth = visible.to(predicted.device, predicted.dtype)
    weight = torch.where(truth > 0, 1.0, absent_weight).to(predicted.dtype)
    return (weight * (predicted - truth).abs()).mean()


@torch.no_grad()
def argmax_on_bone(points_px: Tensor, seg_logits: Tensor, bones: Tensor) -> Tensor:
    """(B, L) bool: the predicted class at each heatmap's argmax, (B, L, 2) image px of :func:`image_argmax`, is
    one of its landmark's bones. An argmax in the canvas margin reads the nearest image pixel (the segmentation
    covers the image only)."""
    batch, landmarks = points_px.shape[:2]
    height, width = seg_logits.shape[-2:]
    points = points_px.long()
    where = points[..., 1].clamp(0, height - 1) * width + points[..., 0].clamp(0, width - 1)
    classes = seg_logits.argmax(dim=1).reshape(batch, -1)  # (B, P)
    class_at = classes.gather(1, where)  # (B, L)
    return bones.to(seg_logits.device)[torch.arange(landmarks, device=seg_logits.device)[None], class_at]


@torch.no_grad()
def discrete_visibility(heatmap_logits: Tensor, seg_logits: Tensor, bones: Tensor) -> Tensor:
    """(B, L) the paper's v̂ ∈ {0, 0.5, 1}: 0 not present (or peaking in the canvas margin, outside the image),
    0.5 at a pixel not of its bones, 1 on one of them. Heatmaps on the canvas, segmentation on the image."""
    batch, landmarks = heatmap_logits.shape[:2]
    height, width = seg_logits.shape[-2:]
    peak = heatmap_logits.float().reshape(batch, landmarks, -1).amax(dim=-1)
    points = image_argmax(heatmap_logits, canvas_margin(heatmap_logits, seg_logits.shape))  # (B, L, 2) image px
    present = (torch.sigmoid(peak) >= PRESENT_PROBABILITY) & on_pixel_grid(points, height, width)
    return torch.where(present, torch.where(argmax_on_bone(points, seg_logits, bones), 1.0, 0.5), 0.0)


@dataclasses.dataclass(frozen=True)
class SegInformedTerms:
    """The seg-informed loss of one batch and its parts, for the training log."""

    loss: Tensor
    log: dict[str, float]


def seg_informed_loss(
    outputs: Tensor,
    labels: Tensor,
    landmarks_px: Tensor,
    visible: Tensor,
    bones: Tensor,
    sigma_px: float,
    weights: tuple[float, float, float] = (SEG_WEIGHT, KL_WEIGHT, VISIBILITY_WEIGHT),
    absent_weight: float = ABSENT_WEIGHT,
) -> SegInformedTerms:
    """``w_seg (Dice + CE) + w_KL KL + w_vis L_vis`` on the model's outputs (see the module docstring).

    Args:
        outputs: (B, L + K, H + 2m, W + 2m) the network's output, on a canvas of margin m ≥ 0.
        labels: (B, H, W) true class values at model resolution.
        landmarks_px: (B, L, 2) true landmarks at model resolution, in image pixels (those outside the image too);
            visible: (B, L) bool, in the image.
        bones: (L, K) bool landmark-to-bone map.
        sigma_px: the Gaussian target's sigma.
        weights: (w_seg, w_KL, w_vis).
        absent_weight: the visibility loss's weight of a landmark not in the image (:func:`visibility_loss`).

    On a canvas the KL divergence covers every landmark that projects onto it (``visible`` or not), at its
    position shifted by m; the segmentation's losses see the image only, and the visibility loss's truth is
    ``visible``, presence in the image.
    """
    n_landmarks = bones.shape[0]
    height, width = labels.shape[-2:]
    margin = canvas_margin(outputs, labels.shape)
    heatmaps, seg_logits = split_outputs(outputs.float(), n_landmarks, margin)
    dice, ce = dice_ce_loss(seg_logits, labels)
    points = landmarks_px.to(heatmaps.device).float()
    on_canvas = visible.to(heatmaps.device, torch.bool)
    if margin:
        points = points + margin
        on_canvas = torch.isfinite(points).all(-1) & on_pixel_grid(points, height + 2 * margin, width + 2 * margin)
    targets = gaussian_targets(points, on_canvas, height + 2 * margin, width + 2 * margin, sigma_px)
    kl = kl_heatmap_loss(heatmaps, targets, on_canvas)
    vis = visibility_loss(soft_visibility(heatmaps, seg_logits, bones), visible, absent_weight)
    w_seg, w_kl, w_vis = weights
    loss = w_seg * (dice + ce) + w_kl * kl + w_vis * vis
    log = {"dice_loss": float(dice.detach()), "ce_loss": float(ce.detach()), "kl_loss": float(kl.detach()), "vis_loss": float(vis.detach())}
    return SegInformedTerms(loss, log)

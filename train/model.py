"""The landmark heatmap model (a segmentation-models-pytorch U-Net) and the soft-argmax of paper eqs. 1-2.

The U-Net maps a (B, 1, S, S) image to (B, L, S, S) logits, one channel per
landmark. Encoders start from random weights: nothing is downloaded. A local
weights file (``ModelSpec.encoder_weights``) may hold the encoder's state
dict, e.g. ImageNet weights copied by hand onto a machine behind a firewall.

Soft-argmax temperature
    Paper eq. 2 divides the heatmap by τ before the softmax over all S² pixels.
    pelmark applies it to the logits, not to sigmoid probabilities: a
    probability lies in [0, 1], so at τ = 1 a peak of 1 among 512² zeros gets
    e/(e + 262143) of the mass and the soft-argmax is the image centre whatever
    the model predicts. Logits of a trained model span about -15 to +5, so at
    τ = 1 a disk of ~100 pixels holds nearly all the mass and the soft-argmax
    sits at its centroid, while every pixel of the disk still passes gradient.
    τ → 0 turns soft-argmax into the hard argmax, whose gradient is zero almost
    everywhere; a large τ flattens it towards the image centre. The default
    τ = 1 (``TrainConfig.temperature``) keeps both failure modes away on
    logits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from pelmark.errors import PelmarkError

# smp's decoder widths for depth 5; a shallower encoder uses the first ``depth`` of them.
DECODER_CHANNELS = (256, 128, 64, 32, 16)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs to rebuild the network.

    Attributes:
        classes: number of landmarks (output channels).
        encoder: any smp encoder name (default resnet34, as in the paper's smp U-Net).
        encoder_depth: number of encoder stages, 3 to 5 (the paper uses 5).
        in_channels: image channels (1 for X-ray).
        encoder_weights: optional local file with the encoder's state dict.
        segmentation_classes: the bone classes of a segmentation-informed model (seed 003; see
            :mod:`pelmark.train.seg_informed`): a second decoder outputs their C + 1 logits
            (background first) after the landmark heatmaps. () for the plain heatmap U-Net.
        canvas_margin: a segmentation-informed model's canvas margin in model px: it pads its input by
            this much on every side and predicts on the padded canvas (see
            :mod:`pelmark.train.seg_informed`); 0 = outputs of the input's size.
        decoder_channels: widths of the decoder's blocks from the deepest up, at least one per
            encoder stage; a shallower encoder uses the first ``encoder_depth`` of them, as with
            smp's defaults (None = 256, 128, 64, 32, 16). The decoder's full-resolution
            blocks cost most of a step at small inputs: halving them makes a 128² U-Net of
            depth 4 about twice as fast on a CPU (see the README's ablation).
    """

    classes: int
    encoder: str = "resnet34"
    encoder_depth: int = 5
    in_channels: int = 1
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] | None = None
    segmentation_classes: tuple[str, ...] = ()
    canvas_margin: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "segmentation_classes", tuple(str(c) for c in self.segmentation_classes))
        if self.decoder_channels is not None:
            object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
            if len(self.decoder_channels) < self.encoder_depth or min(self.decoder_channels) < 1:
                raise PelmarkError(
                    f"decoder_channels needs at least {self.encoder_depth} positive widths (one per encoder stage), "
                    f"got {list(self.decoder_channels)}"
                )
        if self.classes < 1:
            raise PelmarkError(f"a model needs at least one landmark, got {self.classes}")
        if not 3 <= self.encoder_depth <= 5:
            raise PelmarkError(f"encoder_depth must be 3, 4 or 5, got {self.encoder_depth}")
        object.__setattr__(self, "canvas_margin", int(self.canvas_margin))
        if self.canvas_margin < 0 or (self.canvas_margin and not self.segmentation_classes):
            raise PelmarkError(f"a canvas margin ({self.canvas_margin}) needs a segmentation-informed model and must not be negative")

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return (self.decoder_channels or DECODER_CHANNELS)[: self.encoder_depth]

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.decoder_channels is not None:
            values["decoder_channels"] = list(self.decoder_channels)
        values["segmentation_classes"] = list(self.segmentation_classes)
        return values

    @property
    def output_channels(self) -> int:
        """Landmark heatmaps, then (for a segmentation-informed model) background and each bone class."""
        return output_channels(self.classes, self.segmentation_classes)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def output_channels(n_landmarks: int, segmentation_classes: tuple[str, ...] | list[str] = ()) -> int:
    """A model's output channels: the landmark heatmaps, then for a segmentation-informed model
    (``segmentation_classes`` not empty) the background's and each bone class's logits."""
    return n_landmarks + (len(segmentation_classes) + 1 if segmentation_classes else 0)


def build_model(spec: ModelSpec) -> nn.Module:
    """A U-Net with random weights (plus the local encoder weights, if any); with ``segmentation_classes``,
    the two-decoder :class:`~pelmark.train.seg_informed.SegInformedNet`."""
    model = _unet(spec, spec.classes)
    if spec.segmentation_classes:
        from pelmark.train.seg_informed import SegInformedNet

        model = SegInformedNet(model, _unet(spec, len(spec.segmentation_classes) + 1), spec.canvas_margin)
    if spec.encoder_weights:
        load_encoder_weights(model, Path(spec.encoder_weights))
    freeze_unused(model, spec)
    return model


def _unet(spec: ModelSpec, outputs: int) -> nn.Module:
    import segmentation_models_pytorch as smp

    try:
        return smp.Unet(
            encoder_name=spec.encoder,
            encoder_depth=spec.encoder_depth,
            encoder_weights=None,
            decoder_channels=spec.decoder_widths,
            in_channels=spec.in_channels,
            classes=outputs,
        )
    except (KeyError, ValueError, RuntimeError) as error:
        raise PelmarkError(f"cannot build a U-Net with encoder '{spec.encoder}': {error}") from None


PRUNED_ATTRIBUTE = "_pelmark_pruned"


def freeze_unused(model: nn.Module, spec: ModelSpec) -> None:
    """Remove the submodules the forward pass never uses, and turn off gradients of any other unused parameter.

    smp keeps an encoder's deeper stages when ``encoder_depth`` < 5 but never
    runs them (ResNet-18 at depth 4: 8.4 M of its 13 M weights); DDP refuses
    parameters that get no gradient, and checkpoints would carry them. A
    submodule all of whose parameters get no gradient is replaced by an empty
    ``nn.Identity``; its names are kept on the model (``_pelmark_pruned``) so
    that :func:`load_weights` reads checkpoints that still hold them. The
    modules are built, and their random weights drawn, before they are
    removed, so a seed gives the same weights as before.
    """
    side = 2 ** (spec.encoder_depth + 1)
    probe = torch.zeros(1, spec.in_channels, side, side)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    model(probe).sum().backward()
    pruned: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name == p or name.startswith(p + ".") for p in pruned):
            continue
        parameters = list(module.parameters())
        if parameters and all(parameter.grad is None for parameter in parameters):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
            pruned.append(name)
    for parameter in model.parameters():
        if parameter.grad is None:
            parameter.requires_grad_(False)
        parameter.grad = None
    setattr(model, PRUNED_ATTRIBUTE, tuple(pruned))
    model.train(was_training)


def load_weights(model: nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """``load_state_dict`` (strict), leaving out the tensors of submodules :func:`freeze_unused` removed.

    Checkpoints written before pelmark removed them hold those tensors; they were never used.

    Raises:
        PelmarkError: the weights in ``path`` miss a tensor of the model, have one it lacks, or one of another shape.
    """
    pruned = getattr(model, PRUNED_ATTRIBUTE, ())
    if pruned:
        weights = {k: v for k, v in weights.items() if not any(k.startswith(p + ".") for p in pruned)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        own = model.state_dict()
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or extra:
            names, kind = (missing, "missing") if missing else (extra, "unexpected")
            detail = f"{kind} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        else:  # a tensor of another shape: torch's own last line names it
            detail = str(error).strip().splitlines()[-1].strip()
        raise PelmarkError(f"its weights do not fit the model: {detail}", Path(path)) from None


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load an encoder state dict from a local file; 3-channel first convolutions are summed to 1 channel.

    Raises:
        PelmarkError: the file is missing, unreadable, or matches none of the encoder's weights.
    """
    if not path.is_file():
        raise PelmarkError("encoder weights file not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise PelmarkError(f"cannot read encoder weights: {error}", path) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PelmarkError("encoder weights file does not hold a state dict", path)
    own = model.encoder.state_dict()
    matched: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("encoder.")
        if key not in own or not isinstance(value, Tensor):
            continue
        if value.ndim == 4 and own[key].ndim == 4 and value.shape[1] != own[key].shape[1] and own[key].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape == own[key].shape:
            matched[key] = value
    if not matched:
        raise PelmarkError("no tensor in the file matches the encoder's weights", path)
    own.update(matched)
    model.encoder.load_state_dict(own)


def soft_argmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Paper eqs. 1-2: the softmax-weighted mean pixel of each heatmap.

    Args:
        logits: (B, L, H, W) heatmaps (logits, see the module docstring).
        temperature: τ > 0.

    Returns:
        (B, L, 2) float32 points, x = column and y = row of pixel centres.
    """
    if temperature <= 0:
        raise PelmarkError(f"the soft-argmax temperature must be positive, got {temperature}")
    batch, landmarks, height, width = logits.shape
    weights = torch.softmax(logits.float().reshape(batch, landmarks, -1) / temperature, dim=-1)
    weights = weights.reshape(batch, landmarks, height, width)
    cols = torch.arange(width, dtype=weights.dtype, device=weights.device)
    rows = torch.arange(height, dtype=weights.dtype, device=weights.device)
    x = (weights.sum(dim=2) * cols).sum(dim=-1)
    y = (weights.sum(dim=3) * rows).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


def local_soft_argmax(logits: Tensor, radius: int, temperature: float = 1.0) -> Tensor:
    """Soft-argmax restricted to a (2r+1)² window centred on each heatmap's hard argmax.

    The window's position is the argmax (no gradient); inside it, the point is
    the softmax(logits / τ)-weighted mean pixel, so it always lies within
    ``radius`` px of the argmax that Table 1 scores, and the gradient moves the
    peak rather than mass far away from it. Pixels of the window outside the
    image get no weight.

    Args:
        logits: (B, L, H, W) heatmaps.
        radius: half-width of the window in pixels (>= 1).
        temperature: τ > 0.

    Returns:
        (B, L, 2) float32 points, x = column and y = row of pixel centres.
    """
    if temperature <= 0:
        raise PelmarkError(f"the soft-argmax temperature must be positive, got {temperature}")
    if radius < 1:
        raise PelmarkError(f"the soft-argmax window radius must be at least 1 px, got {radius}")
    batch, landmarks, height, width = logits.shape
    flat = logits.reshape(batch, landmarks, -1)
    peak = flat.detach().argmax(dim=-1)
    offsets = torch.arange(-radius, radius + 1, device=logits.device)
    cols = (peak % width)[..., None] + offsets  # (B, L, K)
    rows = (peak // width)[..., None] + offsets
    inside = ((rows >= 0) & (rows < height))[..., :, None] & ((cols >= 0) & (cols < width))[..., None, :]
    index = rows.clamp(0, height - 1)[..., :, None] * width + cols.clamp(0, width - 1)[..., None, :]
    values = flat.gather(-1, index.reshape(batch, landmarks, -1)).float() / temperature
    values = values.masked_fill(~inside.reshape(batch, landmarks, -1), float("-inf"))
    weights = torch.softmax(values, dim=-1).reshape(batch, landmarks, len(offsets), len(offsets))
    x = (weights.sum(dim=2) * cols.to(weights.dtype)).sum(dim=-1)
    y = (weights.sum(dim=3) * rows.to(weights.dtype)).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


@torch.no_grad()
def heatmap_statistics(logits: Tensor, points_px: Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
    """Per heatmap: how far ``points_px`` lie from its hard argmax, and how peaked it is.

    Args:
        logits: (B, L, H, W) heatmaps.
        points_px: (B, L, 2) points to compare with the hard argmax (e.g. the soft-argmax PEL uses).
        temperature: τ of the global softmax whose mass is measured.

    Returns:
        (B, L) tensors: ``soft_hard_px``, the distance between ``points_px`` and the
        hard argmax; ``peak_logit``, the largest logit; ``mass_5px``, the share of
        the global softmax(logits / τ) within 5 px of the hard argmax.
    """
    batch, landmarks, height, width = logits.shape
    logits = logits.float()
    hard = hard_argmax(logits)
    distance = (points_px.float().to(hard.device) - hard).norm(dim=-1)
    flat = logits.reshape(batch, landmarks, -1)
    weights = torch.softmax(flat / temperature, dim=-1).reshape(logits.shape)
    cols = torch.arange(width, device=logits.device, dtype=torch.float32)
    rows = torch.arange(height, device=logits.device, dtype=torch.float32)
    near = (cols[None, None, None, :] - hard[..., 0, None, None]).square() + (rows[None, None, :, None] - hard[..., 1, None, None]).square() <= 25.0
    return {"soft_hard_px": distance, "peak_logit": flat.amax(dim=-1), "mass_5px": (weights * near).sum(dim=(-1, -2))}


def heatmap_diagnostics(logits: Tensor, points_px: Tensor, visible: Tensor, temperature: float = 1.0) -> dict[str, float]:
    """:func:`heatmap_statistics` averaged over the visible landmarks (NaN if none), for the training log."""
    mask = visible.to(logits.device, torch.bool)
    if not bool(mask.any()):
        return {"soft_hard_px": float("nan"), "peak_logit": float("nan"), "mass_5px": float("nan")}
    return {name: float(values[mask].mean()) for name, values in heatmap_statistics(logits, points_px, temperature).items()}


def hard_argmax(heatmaps: Tensor) -> Tensor:
    """(B, L, 2) float32 location (x = column, y = row) of each heatmap's maximum, as the paper evaluates."""
    batch, landmarks, height, width = heatmaps.shape
    flat = heatmaps.reshape(batch, landmarks, -1).argmax(dim=-1)
    return torch.stack([flat % width, flat // width], dim=-1).to(torch.float32)


# ---------------------------------------------------------------- flip test


def output_mirror_order(landmark_names: tuple[str, ...] | list[str], classes: tuple[str, ...] | list[str] = ()) -> tuple[int, ...] | None:
    """Channel order that mirrors a model's outputs: L landmark logits, then (segmentation models)
    background and the C bone classes. Left and right swap (:func:`pelmark.landmark_sets.mirror_order`).

    Returns:
        The order, or None when the landmarks have no left/right pairs.

    Raises:
        PelmarkError: a left or right landmark or bone class lacks its partner.
    """
    from pelmark.landmark_sets import mirror_order

    landmarks = mirror_order(landmark_names)
    if landmarks is None:
        return None
    if not classes:
        return landmarks
    bones = mirror_order(classes) or tuple(range(len(classes)))
    offset = len(landmarks)
    return landmarks + (offset,) + tuple(offset + 1 + k for k in bones)


def flip_test(forward, images: Tensor, order: tuple[int, ...], together: bool = False) -> Tensor:
    """Logits averaged over an image and its left-right mirror image (the flip test of pose estimation).

    ``forward`` maps (B, 1, H, W) images to (B, K, H, W) logits. The mirror image's logits are
    mirrored back and their channels put in ``order`` (:func:`output_mirror_order`), so that the
    patient's left landmark reads from the channel that saw it, then both are averaged. The column
    ``c`` of a mirror image is column ``W - 1 - c`` of the image, so mirroring back is exact on the
    pixel grid. Averaging logits keeps a peak only where both passes put one: a confident false
    peak in one pass is halved. ``together`` runs both in one forward call over a batch of twice
    the size (training: one graph for the backward, and BatchNorm's batch statistics over both).
    """
    if together:
        both = forward(torch.cat([images, images.flip(-1)]))
        direct, mirrored = both[: len(images)], both[len(images) :].flip(-1)
    else:
        direct, mirrored = forward(images), forward(images.flip(-1)).flip(-1)
    return 0.5 * (direct + mirrored[:, torch.as_tensor(order, device=mirrored.device)])


def choose_flip_order(
    landmark_names: tuple[str, ...] | list[str], classes: tuple[str, ...] | list[str] = (), asked: bool | None = None
) -> tuple[tuple[int, ...] | None, str | None]:
    """The flip test's channel order for a model, or None with the reason it is off.

    ``asked`` None (auto) turns the flip test on where the outputs mirror (:func:`output_mirror_order`) and
    off otherwise, with the reason; False turns it off; True makes a model that cannot mirror an error.

    Raises:
        PelmarkError: ``asked`` is True and the outputs cannot be mirrored.
    """
    if asked is False:
        return None, None
    try:
        order = output_mirror_order(landmark_names, classes)
        why = None if order is not None else f"no landmark name ends in -l or -r, so left cannot be told from right: {list(landmark_names)}"
    except PelmarkError as error:
        order, why = None, error.message
    if why is None:
        return order, None
    if asked:
        raise PelmarkError(f"no flip test: {why}")
    return None, f"no flip test: {why}"

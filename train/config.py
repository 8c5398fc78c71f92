"""Training configuration: strategies, one frozen dataclass, and how it is resolved.

Precedence, lowest first: the dataclass defaults (the paper's settings), the
strategy's defaults (:data:`STRATEGY_DEFAULTS`), a ``[train]`` table from a
TOML file (a manifest or a standalone config, with optional per-strategy
sub-tables such as ``[train.finetune]``), then command-line options.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pelmark.errors import PelmarkError
from pelmark.registration import PoseLoss, Solver
from pelmark.train.augment import Augment
from pelmark.train.data import TargetKind
from pelmark.train.device_transforms import Transforms


class Strategy(str, enum.Enum):
    """The paper's four training strategies (Fig. 3), and the segmentation-informed model of seed 003."""

    BASELINE = "baseline"  # U-Net with BCE on the landmark masks
    COMPOSITE = "composite"  # BCE + λ·PEL, from random weights (paper eq. 9)
    PEL_ONLY = "pel-only"  # PEL alone, from random weights
    FINETUNE = "finetune"  # PEL alone, from a baseline checkpoint (--init)
    SEG_INFORMED = "seg-informed"  # heatmaps + bone segmentation, Dice + CE, KL and visibility losses (seed 003)

    @property
    def uses_segmentation(self) -> bool:
        return self in (Strategy.BASELINE, Strategy.COMPOSITE)

    @property
    def uses_pel(self) -> bool:
        return self not in (Strategy.BASELINE, Strategy.SEG_INFORMED)


class Schedule(str, enum.Enum):
    CONSTANT = "constant"  # the paper's fixed learning rate
    COSINE = "cosine"  # cosine decay to 0 over the run's steps


class SoftArgmax(str, enum.Enum):
    """Which points PEL registers (see :mod:`pelmark.train.model`)."""

    GLOBAL = "global"  # paper eqs. 1-2: softmax over the whole heatmap
    LOCAL = "local"  # softmax over a window centred on the hard argmax


class RunStatus(str, enum.Enum):
    """The final state recorded in ``run.json``; tables print ``DIV`` for a diverged run, as the paper does."""

    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    DIV = "DIV"
    INTERRUPTED = "INTERRUPTED"


# Epochs from the paper: 28 for the baseline and the PEL-trained models, one for the fine-tune. The fine-tune
# registers the global soft-argmax (the paper's eqs. 1-2) and scores the pose by reprojection error: on the
# demo cohort it was the only variant that beat its own baseline over three seeds (-15.6 % on novel subjects),
# while a window around the argmax (local) could not move a wrong peak and made it worse (README, "The
# fine-tune"). `--pose-loss paper` is the paper's fine-tune (manifests/paper.toml).
STRATEGY_DEFAULTS: dict[Strategy, dict[str, Any]] = {
    Strategy.BASELINE: {"epochs": 28},
    Strategy.COMPOSITE: {"epochs": 28},
    Strategy.PEL_ONLY: {"epochs": 28},
    Strategy.FINETUNE: {"epochs": 1, "soft_argmax": "global", "pose_loss": "reprojection"},
    # Seed 003 regresses Gaussian heatmaps (KL on their softmax); gaussian_sigma_px sets their width.
    Strategy.SEG_INFORMED: {"epochs": 28, "target": "gaussian"},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        strategy: which of the four strategies.
        epochs: passes over the training images.
        max_steps: stop after this many optimiser steps in all (None = no limit).
        batch_size: images per optimiser step (over all DDP processes).
        micro_batches: each process's part of a batch is run in this many pieces whose gradients
            are averaged (gradient accumulation: less memory, the same step; the same as that
            many DDP processes, BatchNorm statistics included).
        lr: Adam learning rate (paper 1e-4).
        schedule: constant (paper) or cosine decay.
        warmup_steps: the learning rate rises linearly from lr/warmup_steps to lr over this many
            first steps, then follows ``schedule`` over the rest (0 = no warm-up, the paper's).
        size: side of the square model input (paper 512).
        encoder, encoder_depth, encoder_weights, decoder_channels: the U-Net (see
            :class:`~pelmark.train.model.ModelSpec`).
        init: checkpoint to start from (required by finetune; a run dir or a .pt file).
        target, disk_radius_px, gaussian_sigma_px: the targets (see :class:`~pelmark.train.data.DataSettings`).
        augment: none, basic or realistic (:mod:`pelmark.train.augment`); a ``run.json`` written when
            this was a boolean reads true as basic and false as none.
        pos_weight: BCE weight of the mask's pixels against the background (paper: 1, plain BCE).
        pel_weight: λ of paper eq. 9, the weight of PEL in composite, pel-only and finetune
            (the paper does not give its value).
        bce_weight: weight of the BCE heatmap loss; None = the strategy's (1 for baseline and
            composite, 0 for pel-only and finetune, the paper's). A finetune with
            bce_weight 1 is the combined fine-tune, BCE + λ·PEL, from a baseline.
        softmax_weight: weight of the spatial-softmax cross-entropy of the heatmaps against their
            targets (:func:`~pelmark.train.losses.spatial_softmax_loss`), added wherever BCE is used
            (0 = the paper's BCE alone).
        seg_weight, kl_weight, visibility_weight: seg-informed's loss weights (seed 003: 1, 0.1, 10), of
            Dice + cross-entropy, the heatmaps' KL divergence and the visibility loss
            (:mod:`pelmark.train.seg_informed`).
        visibility_warmup_steps: the visibility loss's weight rises linearly from 0 to
            ``visibility_weight`` over this many first steps, so that the heatmaps form before it
            pushes the peaks of often-absent landmarks down (0 = full weight from the start, seed 003's).
        visibility_absent_weight: the visibility loss's weight of a landmark that is not in the image, against 1
            for one that is (seed 003: 2, false positives cost double; 1 weighs both errors as accuracy does).
        canvas_margin_px: seg-informed only: the model predicts on its input padded by this many model
            px on every side, so that a landmark just outside the image can peak outside it and be
            reported absent (:mod:`pelmark.train.seg_informed`); 0 = the paper's, heatmaps of the image.
            ``size + 2 · canvas_margin_px`` must be a multiple of ``2 ** encoder_depth``.
        soft_argmax, soft_argmax_radius: the points PEL registers: ``global`` (paper eqs. 1-2)
            or ``local`` (a window of this radius, in model px, around the hard argmax).
        pose_loss: paper (eq. 10), geodesic, mtre or reprojection (see :mod:`pelmark.registration.losses`).
        solver: the registration inside PEL: lm (converged, implicit gradient) or the paper's adam / lbfgs.
        temperature: soft-argmax τ on the logits (see :mod:`pelmark.train.model`).
        flip_test: every loss (and the validation that picks ``best``) sees the flip test's logits, the
            mean of each image's and its mirror image's (:func:`pelmark.train.model.flip_test`, one
            forward pass over both), which is what ``pelmark eval`` and ``pelmark predict`` score by
            default; needs landmarks with -l/-r pairs. Twice the compute per step.
        val_fraction: share of the train split's images held out to choose the best checkpoint.
        bn_recalibration_images: training images over which BatchNorm's statistics are recomputed
            before each validation and checkpoint ("precise BN"; 0 = keep the running averages).
        seed: seeds the weights, the data order and the augmentation (paper 42).
        workers: DataLoader worker processes.
        device: auto (CUDA if present), cpu, cuda or cuda:N.
        compile: ``torch.compile`` the model for the training steps (the first steps are slower
            while it compiles; needs a C++ compiler on CPU). Off by default.
        transforms: where crop, resize, normalisation and ``basic`` augmentation run: ``worker``
            (the DataLoader processes, per image), ``device`` (the trainer, per batch) or ``auto``
            (device on CUDA, worker on a CPU and for ``realistic``); see
            :mod:`pelmark.train.device_transforms`. The two compute the same images up to float32
            rounding, so a resume may change it.
        checkpoint_every: also write ``last`` every this many steps (0 = at epoch ends only).
        divergence_factor: a loss above this multiple of the mean of the first steps' losses is divergence.
        divergence_warmup: steps whose losses set that reference.
    """

    strategy: Strategy = Strategy.BASELINE
    epochs: int = 28
    max_steps: int | None = None
    batch_size: int = 8
    micro_batches: int = 1
    lr: float = 1e-4
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    size: int = 512
    encoder: str = "resnet34"
    encoder_depth: int = 5
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] | None = None
    init: str | None = None
    target: TargetKind = TargetKind.DISK
    disk_radius_px: float = 6.0
    gaussian_sigma_px: float = 3.0
    augment: Augment = Augment.NONE
    pos_weight: float = 1.0
    pel_weight: float = 1.0
    bce_weight: float | None = None
    softmax_weight: float = 0.0
    seg_weight: float = 1.0
    kl_weight: float = 0.1
    visibility_weight: float = 10.0
    visibility_warmup_steps: int = 0
    visibility_absent_weight: float = 2.0
    canvas_margin_px: int = 0
    soft_argmax: SoftArgmax = SoftArgmax.GLOBAL
    soft_argmax_radius: int = 3
    pose_loss: PoseLoss = PoseLoss.PAPER
    solver: Solver = Solver.LM
    temperature: float = 1.0
    flip_test: bool = False
    val_fraction: float = 0.1
    bn_recalibration_images: int = 256
    seed: int = 42
    workers: int = 2
    device: str = "auto"
    compile: bool = False
    transforms: Transforms = Transforms.AUTO
    checkpoint_every: int = 50
    divergence_factor: float = 1000.0
    divergence_warmup: int = 10

    # Settings that change how a run executes but not what it computes (a resume may change them).
    RUNTIME_FIELDS = ("workers", "device", "compile", "transforms", "checkpoint_every")
    # What a resume may change: the runtime settings, and the run's length (to extend it).
    RESUMABLE_FIELDS = (*RUNTIME_FIELDS, "epochs", "max_steps")

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append("epochs must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be at least 1")
        if self.batch_size < 1 or self.micro_batches < 1 or self.size < 8 or self.workers < 0:
            problems.append("need batch_size >= 1, micro_batches >= 1, size >= 8 and workers >= 0")
        if self.pos_weight <= 0:
            problems.append("pos_weight must be positive")
        if not self.lr > 0 or not self.temperature > 0 or self.pel_weight < 0:
            problems.append("need lr > 0, temperature > 0 and pel_weight >= 0")
        if (self.bce_weight is not None and self.bce_weight < 0) or self.softmax_weight < 0:
            problems.append("bce_weight and softmax_weight must not be negative")
        if min(self.seg_weight, self.kl_weight, self.visibility_weight) < 0:
            problems.append("seg_weight, kl_weight and visibility_weight must not be negative")
        if self.visibility_absent_weight <= 0:
            problems.append("visibility_absent_weight must be positive")
        if self.visibility_warmup_steps < 0:
            problems.append("visibility_warmup_steps must not be negative")
        if self.canvas_margin_px:
            canvas, stride = self.size + 2 * self.canvas_margin_px, 2**self.encoder_depth
            if self.strategy is not Strategy.SEG_INFORMED:
                problems.append(f"canvas_margin_px works with the seg-informed strategy only, not {self.strategy.value}")
            elif self.canvas_margin_px < 0 or canvas % stride:
                problems.append(
                    f"canvas_margin_px {self.canvas_margin_px} gives a canvas of {canvas} px, which must be a positive multiple of "
                    f"{stride} (2 ** encoder_depth)"
                )
        if self.soft_argmax_radius < 1:
            problems.append("soft_argmax_radius must be at least 1")
        if self.warmup_steps < 0:
            problems.append("warmup_steps must not be negative")
        if self.bn_recalibration_images < 0:
            problems.append("bn_recalibration_images must not be negative")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append("val_fraction must be in [0, 1)")
        if self.divergence_factor <= 1.0 or self.divergence_warmup < 1 or self.checkpoint_every < 0:
            problems.append("need divergence_factor > 1, divergence_warmup >= 1, checkpoint_every >= 0")
        if self.transforms == Transforms.DEVICE and Augment.parse(self.augment) is Augment.REALISTIC:
            problems.append("transforms device cannot run augment realistic, which runs in the DataLoader workers only: use transforms worker or auto")
        if problems:
            raise PelmarkError("invalid train settings: " + "; ".join(problems))

    @property
    def bce(self) -> float:
        """The BCE weight in force (see ``bce_weight``)."""
        if self.bce_weight is not None:
            return self.bce_weight
        return 1.0 if self.strategy.uses_segmentation else 0.0

    @property
    def pel(self) -> float:
        """The PEL weight in force: ``pel_weight`` for the strategies that use PEL, else 0."""
        return self.pel_weight if self.strategy.uses_pel else 0.0

    def to_dict(self) -> dict[str, Any]:
        values = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(self).items()}
        if self.decoder_channels is not None:
            values["decoder_channels"] = list(self.decoder_channels)
        return values

    def differences(self, other: "TrainConfig", ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
        """(name, this config's value, the other's) of every field that differs, except those in ``ignore``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [(k, mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: Path | None = None) -> "TrainConfig":
        return _build(dict(values), source)


_ENUMS = {
    "strategy": Strategy,
    "schedule": Schedule,
    "target": TargetKind,
    "pose_loss": PoseLoss,
    "solver": Solver,
    "soft_argmax": SoftArgmax,
    "augment": Augment,
    "transforms": Transforms,
}


def _build(values: dict[str, Any], source: Path | None) -> TrainConfig:
    if isinstance(values.get("augment"), bool):  # configs and run.json files from before `realistic`
        values["augment"] = Augment.parse(values["augment"])
    for name, kind in _ENUMS.items():
        if name in values and values[name] is not None:
            try:
                values[name] = kind(values[name])
            except ValueError:
                known = ", ".join(k.value for k in kind)
                raise PelmarkError(f"unknown {name} '{values[name]}' (known: {known})", source) from None
    if values.get("decoder_channels") is not None:
        channels = values["decoder_channels"]
        if not isinstance(channels, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
            raise PelmarkError(f"decoder_channels must be a list of whole numbers, got {channels!r}", source)
        values["decoder_channels"] = tuple(channels)
    try:
        return TrainConfig(**values)
    except TypeError as error:
        raise PelmarkError(f"invalid train settings: {error}", source) from None
    except PelmarkError as error:  # a rule over several settings
        raise PelmarkError(error.message, error.path or source) from None


def read_train_table(path: Path) -> dict[str, Any]:
    """The ``[train]`` table of a TOML file (a manifest or a config); {} if it has none.

    Raises:
        PelmarkError: the file is missing or is not valid TOML.
    """
    if not path.is_file():
        raise PelmarkError("config file not found", path)
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PelmarkError(f"not valid TOML: {error}", path) from None
    table = document.get("train", {})
    if not isinstance(table, dict):
        raise PelmarkError("[train] must be a table", path)
    return table


def resolve_config(
    strategy: Strategy | str,
    table: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: Path | None = None,
) -> TrainConfig:
    """Defaults < strategy defaults < ``[train]`` (then ``[train.<strategy>]``) < overrides (None = not given)."""
    try:
        strategy = Strategy(strategy)
    except ValueError:
        known = ", ".join(s.value for s in Strategy)
        raise PelmarkError(f"unknown strategy '{strategy}' (known: {known})") from None
    from pelmark.validation import TrainTable, check

    values: dict[str, Any] = dict(STRATEGY_DEFAULTS[strategy])
    strategies = {s.value for s in Strategy}
    table = dict(table or {})
    plain = {key: value for key, value in table.items() if not isinstance(value, dict)}
    values.update(check(TrainTable, plain, "[train]", source))
    for key, value in table.items():
        if not isinstance(value, dict):
            continue
        if key.replace("_", "-") not in strategies:
            raise PelmarkError(f"[train.{key}] is not a strategy (known: {', '.join(sorted(strategies))})", source)
        # Every strategy's table is checked, so a typo in [train.finetune] shows before the baseline trains.
        specific = check(TrainTable, value, f"[train.{key}]", source)
        if key.replace("_", "-") == strategy.value:
            values.update(specific)
    values.update(check(TrainTable, overrides or {}))
    values["strategy"] = strategy
    return _build(values, source)

"""``pelmark train``: the training loop shared by the four strategies.

Determinism and resume
    The image order of epoch e is a permutation drawn from ``(seed, "order",
    e)`` and augmentation from ``(seed, epoch, row)`` (see
    :mod:`pelmark.train.data`), so neither depends on the process's RNG
    history. ``last.pt`` holds the step within the epoch; a resumed run skips
    the batches already taken and continues with the same ones an
    uninterrupted run would see. On CPU the weights are then the same, bit for
    bit (tested).
Distributed
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process takes a contiguous
    part of each global batch of ``batch_size`` images and DDP averages the
    gradients, so the optimiser sees the same images per step as one process
    would. BatchNorm statistics are per process, as usual with DDP. Rank 0
    alone writes files; every rank validates on the whole validation set, so
    all take the same decisions.
Divergence
    A non-finite loss or gradient, or a loss above ``divergence_factor`` times
    the mean of the first ``divergence_warmup`` losses, stops the run before the
    optimiser step. ``run.json`` records the status ``DIV``, the step and the
    reason; ``last.pt`` keeps the weights from before.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pelmark.devices import resolve_device
from pelmark.errors import PelmarkError
from pelmark.io.outputs import refuse_inputs
from pelmark.landmark_sets import landmark_bone_matrix
from pelmark.seeding import numpy_generator
from pelmark.provenance import git_revision, now_utc, package_versions
from pelmark.store import Split, StoreReader, check_complete
from pelmark.train.checkpoint import (
    CHECKPOINT_FORMAT,
    RUN_FORMAT,
    RUN_VERSION,
    checkpoint_path,
    is_pelmark_run,
    load_checkpoint,
    read_run_json,
    rng_state,
    save_atomic,
    set_rng_state,
    write_run_json,
)
from pelmark.train.config import RunStatus, Schedule, SoftArgmax, Strategy, TrainConfig
from pelmark.train.data import CropParams, DataSettings, StoreDataset, heatmap_targets
from pelmark.train.device_transforms import Transforms, model_inputs, resolve_transforms
from pelmark.train.losses import pel_term, segmentation_loss, spatial_softmax_loss
from pelmark.train.metrics import landmark_rmse, mean_rmse
from pelmark.train.model import ModelSpec, build_model, choose_flip_order, flip_test, load_weights
from pelmark.train.seg_informed import canvas_margin, image_argmax, seg_informed_loss

STEP_FIELDS = (
    "step", "epoch", "loss", "seg_loss", "softmax_loss", "pel_loss", "pel_used", "pel_rot_deg", "pel_trans_mm",
    "soft_hard_px", "peak_logit", "mass_5px", "pel_logit_grad_norm", "lr", "images_per_s",
    "dice_loss", "ce_loss", "kl_loss", "vis_loss",
)  # fmt: skip
EPOCH_FIELDS = ("epoch", "step", "train_loss", "val_rmse_px", "seconds")


def visibility_weight(config: TrainConfig, step: int) -> float:
    """The visibility loss's weight at optimiser ``step`` (0-based): ``visibility_weight``, ramped over the warm-up."""
    if config.visibility_warmup_steps <= 0:
        return config.visibility_weight
    return config.visibility_weight * min(1.0, (step + 1) / config.visibility_warmup_steps)


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What a finished (or stopped) run reports back."""

    run_dir: Path
    status: RunStatus
    steps: int
    best_val_rmse_px: float
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class _State:
    """The counters a checkpoint carries besides the weights."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    best_val_rmse_px: float = math.inf
    best_step: int = -1
    reference_losses: list[float] = dataclasses.field(default_factory=list)
    # The loss summed over the steps since the last metrics_epochs.csv row, so that a resumed run's row
    # averages the same steps as an uninterrupted run's (it was NaN when the checkpoint closed the epoch).
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0


class Diverged(Exception):
    """Raised inside a step; the loop records DIV."""


def setup_distributed(config: TrainConfig) -> Distributed:
    """One process, or a torchrun process group (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(0, 1, resolve_device(config.device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Distributed(torch.distributed.get_rank(), world, device)


def split_validation(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a seeded ``fraction`` of the train split's images."""
    n_val = int(round(fraction * len(rows)))
    if fraction > 0 and len(rows) > 1:
        n_val = min(max(n_val, 1), len(rows) - 1)
    order = numpy_generator(seed, "validation").permutation(len(rows))
    return np.sort(rows[order[n_val:]]), np.sort(rows[order[:n_val]])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's global batches of dataset positions: a seeded permutation, the last partial batch dropped."""
    order = numpy_generator(seed, "order", epoch).permutation(n)
    steps = max(1, n // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Schedule) -> float:
    """The learning rate of ``step`` as a fraction of ``lr``: a linear warm-up, then ``schedule`` over the rest."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule is Schedule.COSINE:
        span = max(total_steps - warmup_steps, 1)
        done = min(step - warmup_steps, span)
        return 0.5 * (1 + math.cos(math.pi * done / span))
    return 1.0


def _rank_part(batch: np.ndarray, dist: Distributed) -> list[int]:
    return np.array_split(batch, dist.world)[dist.rank].tolist()


def _micro_batches(batch: dict[str, Any], pieces: int) -> list[dict[str, Any]]:
    """Split a collated batch into up to ``pieces`` contiguous parts (as DDP splits a global batch across processes)."""
    size = len(batch["index"])
    bounds = np.array_split(np.arange(size), min(pieces, size))
    return [{k: v[int(b[0]) : int(b[-1]) + 1] for k, v in batch.items()} for b in bounds]


class _CsvLog:
    """Append-only CSV; on resume, rows past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, fields: tuple[str, ...], keep_until_step: int | None):
        self.path, self.fields = path, fields
        if keep_until_step is None or not path.is_file():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(fields)
        else:
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= keep_until_step]
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fields)
                writer.writeheader()
                writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow({k: _fmt(row.get(k, "")) for k in self.fields})


def _mean_finite(values: list[float]) -> float:
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class Trainer:
    """One training run; :func:`train` is the entry point."""

    def __init__(self, config: TrainConfig, store: Path, run_dir: Path, dist: Distributed, progress: bool):
        self.config, self.store, self.run_dir, self.dist, self.progress = config, store, run_dir, dist, progress
        reader = StoreReader(store)
        self.landmark_names = reader.landmark_names
        self.store_fingerprint = reader.fingerprint
        seg_informed = config.strategy is Strategy.SEG_INFORMED
        self.classes = reader.classes if seg_informed else ()
        if seg_informed and not self.classes:
            raise PelmarkError("seg-informed trains on bone labels, which this store has not: synthesise it from a manifest with [dataset] classes and segmentations", store)
        try:
            self.flip_order = choose_flip_order(self.landmark_names, self.classes, True)[0] if config.flip_test else None
        except PelmarkError as error:
            raise PelmarkError(f"flip_test: {error.message}", store) from None
        # Under device transforms the workers only read, and every batch (training, validation and
        # BatchNorm's) gets its crop, resize, normalisation and augmentation here (see _inputs).
        self.transforms = resolve_transforms(config.transforms, dist.device, config.augment)
        self.transforms_on_device = self.transforms is Transforms.DEVICE
        data = DataSettings(
            size=config.size,
            target=config.target,
            disk_radius_px=config.disk_radius_px,
            gaussian_sigma_px=config.gaussian_sigma_px,
            splits=(Split.TRAIN,),
            seed=config.seed,
            segmentation=seg_informed,
            device_transforms=self.transforms_on_device,
        )
        rows = StoreDataset(store, data).rows
        train_rows, val_rows = split_validation(rows, config.val_fraction, config.seed)
        if len(train_rows) < dist.world:
            raise PelmarkError(f"{len(train_rows)} training images cannot feed {dist.world} processes", store)
        self.data_settings = dataclasses.replace(data, augment=config.augment)
        # On CUDA (and under device transforms) the heatmap targets are drawn on the device, for the whole
        # batch at once (see _targets): the workers then neither build nor collate and pin 4 bytes x landmarks x size².
        self.targets_on_device = dist.device.type == "cuda" or self.transforms_on_device
        worker_settings = dataclasses.replace(self.data_settings, targets=not self.targets_on_device)
        self.train_set = StoreDataset(store, worker_settings, indices=train_rows)
        self.val_set = StoreDataset(store, dataclasses.replace(data, targets=False), indices=val_rows) if len(val_rows) else None
        # The training images as they are, for BatchNorm's statistics (see recalibrate_batchnorm).
        self.calibration_set = StoreDataset(store, dataclasses.replace(data, targets=False), indices=train_rows)
        self.reference_camera = self.train_set.model_camera(CropParams(0, 0, self.train_set.camera.height, self.train_set.camera.width))
        self.steps_per_epoch = len(epoch_batches(len(self.train_set), config.batch_size, config.seed, 0))
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        torch.manual_seed(config.seed)
        self.spec = ModelSpec(
            classes=len(self.landmark_names),
            encoder=config.encoder,
            encoder_depth=config.encoder_depth,
            encoder_weights=config.encoder_weights,
            decoder_channels=config.decoder_channels,
            segmentation_classes=self.classes,
            canvas_margin=config.canvas_margin_px,
        )
        # Which label values are each landmark's bones (seg-informed's visibility loss).
        self.landmark_bones = torch.tensor(landmark_bone_matrix(self.landmark_names, self.classes)) if self.classes else None
        self.model = build_model(self.spec).to(dist.device)
        if dist.device.type == "cuda":
            # Tensor cores run convolutions in NHWC; cuDNN picks the fastest kernels for the run's one input size.
            # (A 1-channel NCHW image is already NHWC: only the weights and activations change layout.)
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, config.warmup_steps, config.schedule)
        )
        self.net: nn.Module = self.model
        if dist.world > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            # Only the training steps use the compiled module; checkpoints, validation and
            # BatchNorm recalibration use the plain model, whose weights it shares.
            self.net = torch.compile(self.net)
        self.state = _State()

    # ------------------------------------------------------------ state

    def load_init(self, path: Path) -> None:
        """Start from another run's weights (finetune); the landmark set must match."""
        state = load_checkpoint(path)
        names = tuple(state.get("landmark_names", ()))
        if names != self.landmark_names:
            raise PelmarkError(f"--init checkpoint is for landmarks {list(names)}, the store has {list(self.landmark_names)}", Path(path))
        spec = ModelSpec.from_dict(state["model_spec"])
        if (spec.encoder, spec.encoder_depth, spec.decoder_widths) != (self.spec.encoder, self.spec.encoder_depth, self.spec.decoder_widths):
            raise PelmarkError(
                f"--init checkpoint is a {spec.encoder} depth {spec.encoder_depth} U-Net with decoder {list(spec.decoder_widths)}, "
                f"this run asks for {self.spec.encoder} depth {self.spec.encoder_depth} with decoder {list(self.spec.decoder_widths)}",
                Path(path),
            )
        load_weights(self.model, state["model"], Path(path))

    def checkpoint(self, which: str) -> None:
        if not self.dist.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "counters": dataclasses.asdict(self.state),
            "config": self.config.to_dict(),
            "model_spec": self.spec.to_dict(),
            "landmark_names": list(self.landmark_names),
            "store_fingerprint": self.store_fingerprint,
        }
        if which == "last":
            # Only last.pt is resumed from; best.pt is read for its weights (eval, predict, --init), so it
            # leaves out Adam's two moments per weight, two thirds of a checkpoint's bytes.
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng_state())
        save_atomic(state, checkpoint_path(self.run_dir, which))

    def restore(self) -> None:
        path = checkpoint_path(self.run_dir, "last")
        state = load_checkpoint(path)
        if state.get("store_fingerprint") != self.store_fingerprint:
            raise PelmarkError("the run was trained on another store; resume it with the same --store", self.store)
        written = TrainConfig.from_dict(state.get("config", {}), path)
        differ = written.differences(self.config, ignore=TrainConfig.RESUMABLE_FIELDS)
        if differ:
            listed = ", ".join(f"{name} {then} (checkpoint) vs {now} (run)" for name, then, now in differ)
            raise PelmarkError(f"was written by a run with other settings ({listed}); it is stale: start again with --overwrite", path)
        load_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = _State(**state["counters"])
        set_rng_state(state["rng"])

    # ------------------------------------------------------------ steps

    def _batches(self, dataset: StoreDataset, batches: list[list[int]]) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.config.workers,
            pin_memory=self.dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimiser step on this process's part of a global batch, in ``micro_batches`` pieces."""
        config = self.config
        self.net.train()
        parts = _micro_batches(batch, config.micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        rows = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or self.dist.world == 1 else self.net.no_sync()
            with sync:
                loss, row = self._loss(part)
                if not math.isfinite(self._agreed_loss(loss.detach())):
                    raise Diverged(f"non-finite loss ({float(loss.detach())})")
                (loss / len(parts)).backward()
            rows.append(row)
        row = {k: _mean_finite([r.get(k, float("nan")) for r in rows]) for k in dict.fromkeys(k for r in rows for k in r)}
        row["pel_used"] = int(sum(r.get("pel_used", 0) for r in rows)) if "pel_used" in rows[0] else ""
        row["loss"] = self._agreed_loss(torch.tensor(row["loss"], dtype=torch.float64, device=self.dist.device))
        self._check_loss(row["loss"])
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.detach().abs().max() for g in grads])).all()):
            raise Diverged("non-finite gradient")
        self.optimizer.step()
        self.scheduler.step()
        return row

    def _inputs(self, batch: dict[str, Any], settings: DataSettings) -> dict[str, Any]:
        """The batch on the device, its model inputs made there under device transforms (``settings``: its dataset's)."""
        # From pinned memory (CUDA) the copies run while the host goes on queueing kernels.
        batch = {k: v.to(self.dist.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model_inputs(batch, settings) if self.transforms_on_device else batch

    def _images(self, batch: dict[str, Any], settings: DataSettings) -> torch.Tensor:
        """The batch's model input images on the device (only they are copied under worker transforms)."""
        if not self.transforms_on_device:
            return batch["image"].to(self.dist.device, non_blocking=True)
        return self._inputs(batch, settings)["image"]

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The strategy's loss on one (micro-)batch, and its parts for the log."""
        config, device = self.config, self.dist.device
        batch = self._inputs(batch, self.train_set.settings)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = self._forward(self.net, batch["image"], together=True)
        logits = logits.float()
        row: dict[str, Any] = {}
        loss = logits.new_zeros(())
        if config.bce > 0:
            targets = self._targets(batch)
            seg = segmentation_loss(logits, targets, config.pos_weight)
            loss = loss + config.bce * seg
            row["seg_loss"] = float(seg.detach())
            if config.softmax_weight > 0:
                spatial = spatial_softmax_loss(logits, targets, batch["visible"])
                loss = loss + config.bce * config.softmax_weight * spatial
                row["softmax_loss"] = float(spatial.detach())
        if self.landmark_bones is not None:
            terms = seg_informed_loss(
                logits,
                batch["segmentation"],
                batch["landmarks_px"],
                batch["visible"],
                self.landmark_bones,
                config.gaussian_sigma_px,
                (config.seg_weight, config.kl_weight, visibility_weight(config, self.state.step)),
                absent_weight=config.visibility_absent_weight,
            )
            loss = loss + terms.loss
            row.update(terms.log)
        if config.pel > 0:
            term = pel_term(
                logits,
                batch["visible"],
                batch["intrinsics"],
                batch["landmarks_3d"],
                batch["pose"],
                self.reference_camera,
                config.temperature,
                config.pose_loss,
                config.solver,
                window_radius=config.soft_argmax_radius if config.soft_argmax is SoftArgmax.LOCAL else None,
            )
            loss = loss + config.pel * term.loss
            row.update(pel_loss=float(term.loss.detach()), pel_used=term.n_used, pel_rot_deg=term.rotation_deg, pel_trans_mm=term.translation_mm)
            row.update(term.diagnostics)
            if term.loss.requires_grad and term.n_used:
                # The size of PEL's pull on the heatmaps, apart from BCE's (a backward through the registration only).
                (grad,) = torch.autograd.grad(term.loss, logits, retain_graph=True)
                row["pel_logit_grad_norm"] = float(grad.norm())
        row["loss"] = float(loss.detach())
        return loss, row

    def _forward(self, net, images: torch.Tensor, together: bool = False) -> torch.Tensor:
        """The logits the losses and the validation see: one pass, or with ``flip_test`` the flip test's."""
        if self.flip_order is None:
            return net(images)
        return flip_test(net, images, self.flip_order, together=together)

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's heatmap targets: from the workers, or drawn here on the device.

        On the device they are drawn from the float32 ``landmarks_px`` of the batch, the
        workers' from float64 ones: they differ by the float32 rounding of a pixel
        coordinate (below 1e-4 px at 512²).
        """
        if not self.targets_on_device:
            return batch["heatmap_target"]
        size = self.config.size
        return heatmap_targets(batch["landmarks_px"], batch["visible"], size, size, self.data_settings)

    def _agreed_loss(self, loss: torch.Tensor) -> float:
        """The mean loss over all processes, so every rank takes the same divergence decision."""
        if self.dist.world > 1:
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            loss /= self.dist.world
        return float(loss)

    def _check_loss(self, value: float) -> None:
        if not math.isfinite(value):
            raise Diverged(f"non-finite loss ({value})")
        reference = self.state.reference_losses
        if len(reference) < self.config.divergence_warmup:
            reference.append(value)
            return
        limit = self.config.divergence_factor * float(np.mean(reference))
        if value > limit:
            raise Diverged(f"loss {value:.4g} exceeded {self.config.divergence_factor:g} x its first steps' mean ({np.mean(reference):.4g})")

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """Recompute BatchNorm's running statistics over training images with the current weights.

        The running averages that BatchNorm keeps during training mix statistics of
        weights from many steps ago; with a learning rate that moves the weights
        quickly they no longer match the network, and eval-mode predictions
        degrade badly (the demo's baseline: 41.2 / 34.1 px without this, 20.1 / 16.8 px with it).
        This is "precise BatchNorm" (Wu & Johnson, 2021): reset the statistics and
        average them, with equal weights, over ``bn_recalibration_images`` images
        of the training set (a fixed, seeded choice, without augmentation).
        """
        count = min(self.config.bn_recalibration_images, len(self.train_set))
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if count == 0 or not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        positions = np.sort(numpy_generator(self.config.seed, "bn-recalibration").permutation(len(self.train_set))[:count])
        size = self.config.batch_size
        batches = [positions[i : i + size].tolist() for i in range(0, count, size)]
        dataset = self.calibration_set
        self.model.train()
        for batch in self._batches(dataset, batches):
            if len(batch["index"]) < 2:
                continue
            images = self._images(batch, dataset.settings)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dist.device.type == "cuda"):
                self.model(images)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    @torch.no_grad()
    def validate(self) -> float:
        """Table-1 mean RMSE (model px) of the argmax on the validation images; NaN without validation images."""
        if self.val_set is None:
            return float("nan")
        self.net.eval()
        predicted, true, visible = [], [], []
        positions = np.arange(len(self.val_set))
        batches = [positions[i : i + self.config.batch_size].tolist() for i in range(0, len(positions), self.config.batch_size)]
        for batch in self._batches(self.val_set, batches):
            images = self._images(batch, self.val_set.settings)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dist.device.type == "cuda"):
                logits = self._forward(self.model, images)
            margin = canvas_margin(logits, images.shape)
            predicted.append(image_argmax(logits.float()[:, : len(self.landmark_names)], margin).cpu().numpy())
            true.append(batch["landmarks_px"].numpy())
            visible.append(batch["visible"].numpy())
        return mean_rmse(landmark_rmse(np.concatenate(predicted), np.concatenate(true), np.concatenate(visible)))


def _run_info(trainer: Trainer, status: RunStatus, reason: str = "", created: str | None = None) -> dict[str, Any]:
    state = trainer.state
    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "name": trainer.run_dir.name,
        "strategy": trainer.config.strategy.value,
        "status": status.value,
        "reason": reason,
        "config": trainer.config.to_dict(),
        "landmark_names": list(trainer.landmark_names),
        "model_spec": trainer.spec.to_dict(),
        "data": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(trainer.data_settings).items()},
        "store": {
            "path": str(trainer.store.resolve()),
            "fingerprint": trainer.store_fingerprint,
            # The detector of its images: pelmark predict resamples an X-ray to the model's mm per pixel from it.
            "intrinsics": trainer.train_set.camera.to_dict(),
            "train_images": len(trainer.train_set),
            "val_images": 0 if trainer.val_set is None else len(trainer.val_set),
        },
        "steps": state.step,
        "steps_total": trainer.total_steps,
        "epochs_completed": state.epoch,
        "best": {"step": state.best_step, "val_rmse_px": None if not math.isfinite(state.best_val_rmse_px) else state.best_val_rmse_px},
        "world_size": trainer.dist.world,
        "device": str(trainer.dist.device),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "created": created or now_utc(),
        "updated": now_utc(),
    }


def existing_run_state(run_dir: Path) -> str | None:
    """The status of the run in ``run_dir`` that can be resumed or is finished; None when there is none to resume."""
    if not (Path(run_dir) / "run.json").is_file():
        return None
    status = read_run_json(run_dir).get("status")
    if status in (RunStatus.COMPLETE.value, RunStatus.DIV.value):
        return status
    return status if checkpoint_path(run_dir, "last").is_file() else None


# What pelmark train writes into a run folder; --overwrite removes these and nothing else (run.json last).
RUN_FILES = ("metrics_steps.csv", "metrics_epochs.csv")
RUN_FOLDERS = ("tensorboard",)


def prepare_run_dir(
    run_dir: Path, resume: bool, overwrite: bool, inputs: tuple[tuple[str, Path], ...] = ()
) -> dict[str, Any] | None:
    """Check ``run_dir`` before any work (it is not changed); returns the old run.json when resuming.

    Args:
        run_dir: the run folder.
        resume: continue the run in it.
        overwrite: it may hold a pelmark run, which :func:`clear_run_dir` removes later.
        inputs: (what, path) of the run's inputs (the store, ``--init``), which ``run_dir``
            must not be, hold or lie inside.
    """
    refuse_inputs(run_dir, inputs)
    if resume:
        info = read_run_json(run_dir)
        if not checkpoint_path(run_dir, "last").is_file():
            raise PelmarkError("nothing to resume: the run has no last checkpoint yet", run_dir)
        return info
    if run_dir.exists() and not run_dir.is_dir():
        raise PelmarkError("exists and is not a folder", run_dir)
    if (run_dir / "run.json").exists():
        if not is_pelmark_run(run_dir):
            raise PelmarkError("holds a run.json that pelmark did not write; pick an empty or new --out", run_dir)
        if not overwrite:
            raise PelmarkError("already holds a run; pass --resume to continue it, --overwrite to replace it, or another --out", run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise PelmarkError("holds files but no run.json, so it is not a pelmark run folder; pick an empty or new --out", run_dir)
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Remove what an earlier run wrote into ``run_dir`` (checkpoints, metrics, TensorBoard, run.json).

    Other files are left alone. ``run.json`` goes last, so a folder left half-cleared
    by a kill still reads as a pelmark run that ``--overwrite`` may clear again.
    """
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            temporary = path.name.startswith((".last.pt.", ".best.pt.")) and path.name.endswith(".tmp")  # see save_atomic
            if path.is_file() and (path.name in ("last.pt", "best.pt") or temporary):
                path.unlink()
        if not any(checkpoints.iterdir()):
            checkpoints.rmdir()
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
    (run_dir / "run.json").unlink(missing_ok=True)


def check_resume_config(config: TrainConfig, saved: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume with settings other than the run's (a resume may only change runtime fields and extend it)."""
    differ = saved.differences(config, ignore=TrainConfig.RESUMABLE_FIELDS)
    if differ:
        listed = ", ".join(f"{name} {run} (run) vs {now} (now)" for name, run, now in differ)
        raise PelmarkError(f"--resume with settings that differ from the run's: {listed}; pass the run's settings or --overwrite", run_dir)


def check_pel_landmarks(config: TrainConfig, landmark_names: tuple[str, ...], store: Path) -> None:
    """Refuse PEL on a store with too few landmarks to pin a pose: PEL was 0 at every step there."""
    from pelmark.registration import RegistrationSettings

    needed = RegistrationSettings().min_visible
    if config.pel > 0 and len(landmark_names) < needed:
        raise PelmarkError(
            f"{config.strategy.value} trains with PEL, which registers a pose from at least {needed} landmarks; "
            f"the store has {len(landmark_names)} ({', '.join(landmark_names)}): train the baseline, or synthesise more landmarks",
            store,
        )


def train(
    config: TrainConfig,
    store: Path,
    run_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
    allow_incomplete: bool = False,
) -> RunReport:
    """Train one run into ``run_dir`` (see the module docstring).

    Args:
        config: the resolved config; when resuming it must equal the run's saved
            config except for its runtime fields (workers, device, compile, checkpoint_every),
            ``epochs`` and ``max_steps``, which may extend the run.
        store: the synth store.
        run_dir: the run folder (created); not the store, nor the ``--init`` run.
        resume: continue from ``run_dir``'s ``last`` checkpoint.
        overwrite: replace a pelmark run already in ``run_dir``: its checkpoints,
            metrics and run.json are removed before the new run writes its own.
        progress: show a progress bar.
        after_step: called with the global step after each step (tests use it to simulate a crash).
        allow_incomplete: train on the finished subjects of a store whose synth was interrupted
            (refused otherwise); :func:`pelmark.store.check_complete` says what is missing.

    Raises:
        PelmarkError: bad store, an incomplete store, a PEL strategy on a store with too few
            landmarks, bad --init, a run folder in the way, nothing to resume, or a resume with
            other settings than the run's.
    """
    store, run_dir = Path(store), Path(run_dir)
    inputs: tuple[tuple[str, Path], ...] = (("the store", store),)
    if config.init:
        init = Path(config.init)
        inputs += (("the --init run" if init.is_dir() else "the --init checkpoint", init),)
    previous = prepare_run_dir(run_dir, resume, overwrite, inputs)
    check_complete(store, allow_incomplete)
    check_pel_landmarks(config, StoreReader(store).landmark_names, store)
    if previous is not None:
        check_resume_config(config, TrainConfig.from_dict(previous["config"], run_dir / "run.json"), run_dir)
    if config.strategy is Strategy.FINETUNE and not config.init:
        raise PelmarkError("the finetune strategy starts from a baseline: pass --init RUN_DIR_OR_CHECKPOINT")
    dist = setup_distributed(config)
    trainer = Trainer(config, store, run_dir, dist, progress)
    created = None
    if previous is not None:
        trainer.restore()
        created = previous.get("created")
    elif config.init:
        trainer.load_init(Path(config.init))
    if dist.main:
        if previous is None and run_dir.is_dir():
            # A new run never inherits an old run's checkpoints (which --auto-resume would take up).
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        write_run_json(run_dir, _run_info(trainer, RunStatus.RUNNING, created=created))
    keep_until = trainer.state.step if previous is not None else None
    steps_log = _CsvLog(run_dir / "metrics_steps.csv", STEP_FIELDS, keep_until) if dist.main else None
    epochs_log = _CsvLog(run_dir / "metrics_epochs.csv", EPOCH_FIELDS, keep_until) if dist.main else None
    board = _tensorboard(run_dir) if dist.main else None
    status, reason = _loop(trainer, steps_log, epochs_log, board, after_step, created)
    if board is not None:
        board.close()
    if dist.main:
        write_run_json(run_dir, _run_info(trainer, status, reason, created))
    return RunReport(run_dir, status, trainer.state.step, trainer.state.best_val_rmse_px, reason)


def _loop(trainer: Trainer, steps_log, epochs_log, board, after_step, created) -> tuple[RunStatus, str]:
    from tqdm import tqdm

    config, state, dist = trainer.config, trainer.state, trainer.dist
    bar = tqdm(
        total=trainer.total_steps,
        initial=min(state.step, trainer.total_steps),
        desc=f"train {config.strategy.value}",
        unit="step",
        disable=not (trainer.progress and dist.main),
        dynamic_ncols=True,
    )
    try:
        while state.epoch < config.epochs and state.step < trainer.total_steps:
            epoch_start = time.perf_counter()
            trainer.train_set.set_epoch(state.epoch)
            batches = epoch_batches(len(trainer.train_set), config.batch_size, config.seed, state.epoch)
            todo = [_rank_part(b, dist) for b in batches[state.step_in_epoch :]]
            tick = time.perf_counter()
            for batch in trainer._batches(trainer.train_set, todo):
                try:
                    row = trainer.step(batch)
                except Diverged as error:
                    # ``last.pt`` keeps the latest checkpoint from before the divergence; train() records DIV in run.json.
                    return RunStatus.DIV, f"step {state.step + 1}: {error}"
                state.step += 1
                state.step_in_epoch += 1
                now = time.perf_counter()
                row.update(step=state.step, epoch=state.epoch, lr=trainer.scheduler.get_last_lr()[0], images_per_s=config.batch_size / max(now - tick, 1e-9))
                tick = now
                state.epoch_loss_sum += row["loss"]
                state.epoch_loss_steps += 1
                if steps_log is not None:
                    steps_log.write(row)
                    if board is not None:
                        for key in ("loss", "seg_loss", "pel_loss"):
                            if key in row:
                                board.add_scalar(f"train/{key}", row[key], state.step)
                bar.update(1)
                bar.set_postfix(epoch=state.epoch, loss=f"{row['loss']:.4g}")
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    trainer.checkpoint("last")
                if after_step is not None:
                    after_step(state.step)
                if state.step >= trainer.total_steps:
                    break
            if state.step_in_epoch >= len(batches):
                state.epoch += 1
                state.step_in_epoch = 0
            trainer.recalibrate_batchnorm()
            val = trainer.validate()
            improved = math.isfinite(val) and val < state.best_val_rmse_px
            if improved:
                state.best_val_rmse_px, state.best_step = val, state.step
            train_loss = state.epoch_loss_sum / state.epoch_loss_steps if state.epoch_loss_steps else float("nan")
            state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
            trainer.checkpoint("last")
            if improved or trainer.val_set is None:
                trainer.checkpoint("best")
            if epochs_log is not None:
                epochs_log.write(
                    dict(epoch=state.epoch, step=state.step, train_loss=train_loss, val_rmse_px=val,
                         seconds=time.perf_counter() - epoch_start)
                )
                if board is not None and math.isfinite(val):
                    board.add_scalar("val/rmse_px", val, state.step)
            if dist.main:
                write_run_json(trainer.run_dir, _run_info(trainer, RunStatus.RUNNING, created=created))
    except KeyboardInterrupt:
        if dist.main:
            write_run_json(trainer.run_dir, _run_info(trainer, RunStatus.INTERRUPTED, "interrupted; pelmark train --resume continues", created))
        raise
    finally:
        bar.close()
    return RunStatus.COMPLETE, ""


def _tensorboard(run_dir: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

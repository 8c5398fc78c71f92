"""A run folder: ``run.json``, atomic checkpoints, and loading a trained model back.

Layout of ``RUN_DIR``::

    run.json                 config, store digest, versions, git revision, status
    checkpoints/last.pt      the latest state (resume from here)
    checkpoints/best.pt      the state with the lowest validation landmark RMSE
    metrics_steps.csv        one row per optimiser step
    metrics_epochs.csv       one row per epoch (with the validation RMSE)

A checkpoint is a ``torch.save`` dict with the model (unwrapped from DDP),
optimiser and scheduler states, the epoch, the step within it and the global
step, the Python, NumPy, torch (and CUDA) RNG states, the config, the model
spec and the landmark names. Files are written to a temporary name in the same
folder and renamed, so a kill never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pelmark.errors import PelmarkError
from pelmark.io.landmarks import write_text_atomic
from pelmark.train.config import RunStatus, TrainConfig
from pelmark.train.model import ModelSpec, build_model

RUN_FORMAT = "pelmark-run"
RUN_VERSION = 1
CHECKPOINT_FORMAT = "pelmark-checkpoint"


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict; a run folder means its ``best.pt`` (``last.pt`` if there is no best).

    Raises:
        PelmarkError: missing, unreadable, or not a pelmark checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        best, last = checkpoint_path(path, "best"), checkpoint_path(path, "last")
        path = best if best.is_file() else last
    if not path.is_file():
        raise PelmarkError("checkpoint not found", path)
    try:
        # Checkpoints hold RNG states (numpy arrays, tuples), so the full unpickler is needed: load only your own runs.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise PelmarkError(f"cannot read checkpoint: {error}", path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PelmarkError("not a pelmark checkpoint", path)
    return state


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise PelmarkError("not a pelmark run folder (no run.json)", Path(run_dir))
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PelmarkError(f"unreadable run.json: {error}", path) from None
    if info.get("format") != RUN_FORMAT:
        raise PelmarkError("run.json is not a pelmark run", path)
    if info.get("version") != RUN_VERSION:
        raise PelmarkError(f"run written by run format {info.get('version')}, this pelmark reads {RUN_VERSION}", path)
    return info


def write_run_json(run_dir: Path, info: dict[str, Any]) -> None:
    write_text_atomic(Path(run_dir) / "run.json", json.dumps(info, indent=2, default=str) + "\n")


@dataclasses.dataclass
class TrainedRun:
    """A run folder loaded for inference.

    Attributes:
        run_dir: the folder.
        name: its display name (the folder name).
        status: COMPLETE, DIV, ...
        config: the training config.
        landmark_names: the model's output channels, in order.
        model: the network in eval mode (None for a diverged run without checkpoint).
        info: the whole run.json.
    """

    run_dir: Path
    name: str
    status: RunStatus
    config: TrainConfig
    landmark_names: tuple[str, ...]
    model: nn.Module | None
    info: dict[str, Any]


def load_run(run_dir: Path, which: str = "best", device: str | torch.device = "cpu") -> TrainedRun:
    """Read ``run.json`` and the ``best`` (or ``last``) checkpoint's weights.

    A diverged run is returned with its status and, where one was saved, the
    weights from before the divergence; a run with no checkpoint at all fails.

    Raises:
        PelmarkError: not a run folder, another format, or a missing checkpoint.
    """
    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    config = TrainConfig.from_dict(info["config"], run_dir / "run.json")
    status = RunStatus(info.get("status", RunStatus.RUNNING.value))
    names = tuple(info["landmark_names"])
    path = checkpoint_path(run_dir, which)
    if which == "best" and not path.is_file():
        path = checkpoint_path(run_dir, "last")
    if not path.is_file():
        if status is RunStatus.DIV:
            return TrainedRun(run_dir, run_dir.name, status, config, names, None, info)
        wanted = "best.pt or last.pt" if which == "best" else f"{which}.pt"
        raise PelmarkError(f"run has no checkpoint ({wanted})", run_dir / "checkpoints")
    state = load_checkpoint(path)
    model = build_model(dataclasses.replace(ModelSpec.from_dict(state["model_spec"]), encoder_weights=None))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return TrainedRun(run_dir, run_dir.name, status, config, names, model, info)

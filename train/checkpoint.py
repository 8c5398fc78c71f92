"""A run folder: ``run.json``, atomic checkpoints, and loading a trained model back.

Layout of ``RUN_DIR``::

    run.json                 config, store digest, versions, git revision, status
    checkpoints/last.pt      the latest state (resume from here)
    checkpoints/best.pt      the state with the lowest validation landmark RMSE
    metrics_steps.csv        one row per optimiser step
    metrics_epochs.csv       one row per epoch (with the validation RMSE)

A checkpoint is a ``torch.save`` dict with the model (unwrapped from DDP),
the epoch, the step within it and the global step, the config, the model spec
and the landmark names. ``last.pt``, the one a run resumes from, also holds the
optimiser and scheduler states and the Python, NumPy, torch (and CUDA) RNG
states; ``best.pt`` is read only for its weights and leaves them out (a third
of the size). Files are written to a temporary name in the same
folder and renamed, so a kill never leaves a half-written checkpoint.

Checkpoints hold only tensors and plain values (dicts, lists, str, int, float,
bool, None) and are read with ``torch.load(weights_only=True)``, which cannot
run code: a crafted ``best.pt`` is refused, not executed. A checkpoint that
needs the full unpickler (pelmark's earlier ones, which pickled the RNG states
as tuples and NumPy arrays) is refused with the command that converts it,
``pelmark convert-checkpoint OLD NEW --trust`` (:func:`convert_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pelmark.errors import PelmarkError
from pelmark.io.atomic import atomic_open, write_text_atomic
from pelmark.train.config import RunStatus, TrainConfig
from pelmark.train.model import ModelSpec, build_model, load_weights

RUN_FORMAT = "pelmark-run"
RUN_VERSION = 1
CHECKPOINT_FORMAT = "pelmark-checkpoint"


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def plain_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states as tensors and plain values, which ``torch.load(weights_only=True)`` reads.

    Python's state (a tuple) becomes a dict with a list of ints; NumPy's
    (a tuple holding a uint32 array) a dict with the key as an int64 tensor.
    States already in this form are returned as they are.
    """
    plain = dict(state)
    if isinstance(state["python"], tuple):
        version, internal, gauss_next = state["python"]
        plain["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    if isinstance(state["numpy"], tuple):
        kind, key, pos, has_gauss, cached_gaussian = state["numpy"]
        plain["numpy"] = {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    return plain


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(state)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned, bit for bit."""
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    key = numpy_state["key"].numpy().astype(np.uint32)
    np.random.set_state((numpy_state["kind"], key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CONVERT_HINT = (
    "refusing to unpickle Python objects from it (a crafted file could run code); if it is a pelmark checkpoint "
    "you trust, convert it once: pelmark convert-checkpoint OLD NEW --trust"
)


def _read(path: Path, trusted: bool = False) -> Any:
    """``torch.load`` onto the CPU; only ``trusted`` files get the full unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        if not trusted and "weights only" in str(error).lower():
            raise PelmarkError(CONVERT_HINT, path) from None
        raise PelmarkError(f"cannot read checkpoint: {_first_line(error)}", path) from None
    except Exception as error:  # noqa: BLE001 - any other reading failure is a bad file
        raise PelmarkError(f"cannot read checkpoint: {_first_line(error)}", path) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict; a run folder means its ``best.pt`` (``last.pt`` if there is no best).

    Read with ``weights_only=True``: tensors and plain values only, nothing that runs code.

    Raises:
        PelmarkError: missing, unreadable, holding pickled Python objects, or not a pelmark checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        best, last = checkpoint_path(path, "best"), checkpoint_path(path, "last")
        path = best if best.is_file() else last
    if not path.is_file():
        raise PelmarkError("checkpoint not found", path)
    state = _read(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PelmarkError("not a pelmark checkpoint", path)
    return state


def convert_checkpoint(old: Path, new: Path) -> Path:
    """Re-save a checkpoint of an earlier pelmark so that :func:`load_checkpoint` reads it.

    This reads ``old`` with the full unpickler, which runs any code the file
    holds: call it only on a file you trust (the command asks for ``--trust``).

    Raises:
        PelmarkError: ``old`` is missing or not a pelmark checkpoint, or still not loadable after conversion.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise PelmarkError("checkpoint not found", old)
    if new.exists():
        raise PelmarkError("already exists; pick a new file for the converted checkpoint", new)
    state = _read(old, trusted=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PelmarkError("not a pelmark checkpoint", old)
    if "rng" in state:
        state["rng"] = plain_rng_state(state["rng"])
    if "counters" in state:
        state["counters"] = {k: float(v) if isinstance(v, np.floating) else v for k, v in state["counters"].items()}
    save_atomic(state, new)
    try:
        load_checkpoint(new)
    except PelmarkError:
        new.unlink()
        raise PelmarkError("holds values other than tensors and plain data even after conversion", old) from None
    return new


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


def is_pelmark_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run.json written by pelmark train (of any run format version)."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


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
    load_weights(model, state["model"], path)
    model.to(device).eval()
    return TrainedRun(run_dir, run_dir.name, status, config, names, model, info)

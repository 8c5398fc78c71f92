"""The heatmap model behind one interface: a trained run folder (PyTorch) or an exported ONNX file.

Both give the landmark logits, float32, of one (1, 1, H, W) model input and the
:class:`ModelGrid` that says how to make that input. A run's grid comes from its
``run.json``: the model size and encoder depth, and the training store's detector,
recorded under ``store.intrinsics`` by runs trained since it was added; for an earlier run it
is read from the store that ``run.json`` names, or from ``--store``. An ONNX file carries the
grid in its ``metadata_props`` (key :data:`ONNX_METADATA_KEY`), written by ``pelmark export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.infer.preprocess import ModelGrid

ONNX_METADATA_KEY = "pelmark"
ONNX_FORMAT = "pelmark-onnx"
ONNX_VERSION = 1


class HeatmapModel(Protocol):
    name: str
    grid: ModelGrid

    def outputs(self, image: Tensor) -> Tensor:
        """(1, L + K, H, W) float32 outputs of a (1, 1, H, W) input, on the CPU: the L landmark logits,
        then a segmentation-informed model's K segmentation logits (K = 0 for a heatmap model)."""
        ...


def run_store_camera(run_dir: Path, info: dict[str, Any], store: Path | None = None) -> Camera:
    """The training store's detector: ``run.json``'s record, else ``store``, else the store ``run.json`` names.

    Raises:
        PelmarkError: none of them gives it.
    """
    from pelmark.store import StoreReader

    recorded = info.get("store", {}).get("intrinsics")
    if recorded and store is None:
        return Camera.from_dict(recorded)
    path = Path(store) if store is not None else Path(info.get("store", {}).get("path", ""))
    try:
        return StoreReader(path).camera
    except (PelmarkError, KeyError, OSError):
        hint = "" if store is not None else f" and its training store {path} cannot be read; pass --store STORE"
        raise PelmarkError(f"the run does not record its training store's detector{hint}", store or run_dir / "run.json") from None


def run_grid(run, store: Path | None = None) -> ModelGrid:
    """The :class:`ModelGrid` of a loaded :class:`~pelmark.train.checkpoint.TrainedRun`."""
    from pelmark.evaluate.predict import run_classes

    depth = int(run.info.get("model_spec", {}).get("encoder_depth", run.config.encoder_depth))
    return ModelGrid(
        landmark_names=tuple(run.landmark_names),
        store_camera=run_store_camera(run.run_dir, run.info, store),
        size=int(run.config.size),
        multiple=2**depth,
        segmentation_classes=run_classes(run),
    )


class TorchModel:
    """A run folder's ``best`` checkpoint (``last`` when there is no best), in float32 without autocast."""

    def __init__(self, run_dir: Path, device: str = "auto", store: Path | None = None):
        from pelmark.devices import resolve_device
        from pelmark.train.checkpoint import load_run

        run = load_run(Path(run_dir), device=resolve_device(device))
        if run.model is None:
            raise PelmarkError("run has no weights (it diverged before its first checkpoint)", run_dir)
        self.run = run
        self.name = run.name
        self.grid = run_grid(run, store)
        self.device = next(run.model.parameters()).device

    @torch.no_grad()
    def outputs(self, image: Tensor) -> Tensor:
        return self.run.model(image.to(self.device)).float().cpu()


class OnnxModel:
    """An ONNX file written by ``pelmark export``, run with onnxruntime on the CPU."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise PelmarkError("ONNX file not found", path)
        try:
            import onnxruntime
        except ImportError:
            raise PelmarkError("onnxruntime is not installed: pip install 'pelmark[onnx]'") from None
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime reports a bad file with its own exception types
            raise PelmarkError(f"not a readable ONNX model ({type(error).__name__})", path) from None
        metadata = read_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.name = path.name
        self.grid = ModelGrid.from_dict(metadata["grid"])
        self.input_name = self.session.get_inputs()[0].name

    def outputs(self, image: Tensor) -> Tensor:
        (outputs,) = self.session.run(None, {self.input_name: image.numpy().astype(np.float32)})
        return torch.from_numpy(outputs)


def onnx_metadata(grid: ModelGrid, run_name: str, output_channels: int) -> dict[str, Any]:
    """What ``pelmark export`` writes under :data:`ONNX_METADATA_KEY`."""
    return {
        "format": ONNX_FORMAT,
        "version": ONNX_VERSION,
        "run": run_name,
        "grid": grid.to_dict(),
        "output_channels": output_channels,
        "input": "image: (batch, 1, height, width) float32 in [0, 1], a line integral with bone bright, min-max scaled",
        "output": "logits: (batch, channels, height, width); the first len(landmark_names) channels are the landmarks",
    }


def read_onnx_metadata(props: dict[str, str], path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(props[ONNX_METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise PelmarkError("ONNX file has no pelmark metadata; export it with pelmark export", path) from None
    if metadata.get("format") != ONNX_FORMAT or metadata.get("version") != ONNX_VERSION:
        raise PelmarkError(f"ONNX metadata of format {metadata.get('format')} v{metadata.get('version')}, pelmark reads v{ONNX_VERSION}", path)
    return metadata

"""``pelmark export RUN --onnx FILE``: the heatmap model as ONNX, checked against PyTorch.

The graph maps ``image`` (batch, 1, height, width) float32 to ``logits`` (batch, channels,
height, width), with the batch, height and width dynamic (``pelmark predict`` feeds each
X-ray at its own resampled size; the sides must be multiples of ``2 ** encoder depth``).
It is exported by PyTorch's TorchScript-based exporter (opset :data:`OPSET`), which needs no
package beyond ``onnx``. The preprocessing it needs (:class:`~pelmark.infer.preprocess.ModelGrid`:
the landmark names, the training store's detector, the model size and stride) is embedded as
ONNX ``metadata_props`` under the key ``pelmark``.

The check runs onnxruntime and PyTorch on the same inputs, random images in [0, 1] from a
fixed seed at the training size (a batch of 2) and at a non-square size (a batch of 1), and
requires ``max |onnx - torch| <= RTOL x max(1, max |torch|)`` over all logits, with
:data:`RTOL` = 1e-4: float32 convolutions summed in another order differ by a few units in
the last place per layer, far below the gap between a heatmap's peak and its neighbours.
A file that fails the check is removed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from pelmark.errors import PelmarkError
from pelmark.io.atomic import atomic_path

OPSET = 17
RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """The file written and its check: the largest difference, the tolerance and the input shapes compared."""

    path: Path
    max_abs_difference: float
    tolerance: float
    shapes: tuple[tuple[int, ...], ...]

    def line(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.shapes)
        return (
            f"onnxruntime matches PyTorch: max |difference| {self.max_abs_difference:.2e} <= tolerance {self.tolerance:.2e} "
            f"(1e-4 x max(1, max |logit|)) on inputs {shapes}"
        )


def export_onnx(run_dir: Path, path: Path, store: Path | None = None, overwrite: bool = False) -> ExportReport:
    """Export ``run_dir``'s best checkpoint to ONNX at ``path`` with its preprocessing metadata, and check it.

    Raises:
        PelmarkError: no weights, onnx or onnxruntime missing, an existing ``path`` without
            ``overwrite``, or onnxruntime's output outside the tolerance.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise PelmarkError("onnx and onnxruntime are needed: pip install 'pelmark[onnx]'") from None
    from pelmark.infer.backends import ONNX_METADATA_KEY, TorchModel, onnx_metadata

    path = Path(path)
    if path.exists() and not overwrite:
        raise PelmarkError("already exists; pass --overwrite to replace it", path)
    if path.suffix.lower() != ".onnx":
        raise PelmarkError("the ONNX file's name must end in .onnx", path)
    source = TorchModel(run_dir, device="cpu", store=store)
    model, grid = source.run.model.eval(), source.grid
    size = grid.size
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.rand(2, 1, size, size, generator=generator),
        torch.rand(1, 1, size + grid.multiple, max(grid.multiple, size - grid.multiple), generator=generator),
    ]
    with torch.no_grad():
        expected = [model(x).float().numpy() for x in inputs]

    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp:  # renamed to `path` only once onnxruntime agrees with PyTorch
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs onnxscript.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (inputs[0],), str(tmp), dynamo=False, opset_version=OPSET, input_names=["image"],
                output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
            )  # fmt: skip
        graph = onnx.load(str(tmp))
        metadata = onnx_metadata(grid, source.name, int(expected[0].shape[1]))
        graph.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(metadata))
        onnx.save(graph, str(tmp))

        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        difference, scale = 0.0, 1.0
        for x, want in zip(inputs, expected):
            (got,) = session.run(None, {"image": x.numpy()})
            if got.shape != want.shape:
                raise PelmarkError(f"onnxruntime gave shape {got.shape}, PyTorch {want.shape}", run_dir)
            difference = max(difference, float(np.abs(got - want).max()))
            scale = max(scale, float(np.abs(want).max()))
        tolerance = RTOL * scale
        if not difference <= tolerance:
            raise PelmarkError(f"onnxruntime differs from PyTorch by {difference:.2e} > {tolerance:.2e}; nothing written", run_dir)
    return ExportReport(path, difference, tolerance, tuple(tuple(x.shape) for x in inputs))

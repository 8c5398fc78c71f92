"""pelmark export: the ONNX model equals PyTorch's within the stated tolerance, and predict --onnx equals predict with the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pelmark.cli import app
from pelmark.infer.backends import ONNX_METADATA_KEY, OnnxModel, TorchModel
from pelmark.infer.export import RTOL, export_onnx
from xray_fixtures import read_rows, store_camera, store_image, write_dicom, write_png

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "--onnx", str(path)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime matches PyTorch: max |difference|" in result.output and "tolerance" in result.output
    return path


def test_onnx_equals_pytorch_at_any_batch_and_size(run, onnx_file):
    torch_model, onnx_model = TorchModel(run, device="cpu"), OnnxModel(onnx_file)
    assert onnx_model.grid == torch_model.grid
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
    assert metadata["grid"]["landmark_names"] == list(torch_model.grid.landmark_names)
    generator = torch.Generator().manual_seed(1)
    for shape in [(3, 1, 24, 24), (1, 1, 40, 16)]:
        image = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            want = torch_model.run.model(image).numpy()
        (got,) = session.run(None, {"image": image.numpy()})
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= RTOL * max(1.0, np.abs(want).max())


def test_predict_with_onnx_equals_predict_with_the_run(store, run, onnx_file, tmp_path):
    camera = store_camera(store)
    files = [
        write_dicom(tmp_path / "a.dcm", store_image(store, 0), camera.spacing_x_mm, camera.sdd_mm),
        write_png(tmp_path / "b.png", np.repeat(np.repeat(store_image(store, 5), 2, 0), 2, 1)[:90, :84]),
    ]
    # --pixel-spacing overrides the DICOM's too: both become non-square or small inputs padded to the stride.
    common = ["--pixel-spacing", str(camera.spacing_x_mm / 2), "--no-progress"]
    by_run = CliRunner().invoke(app, ["predict", str(run), *map(str, files), "--out", str(tmp_path / "run"), "--device", "cpu", *common])
    by_onnx = CliRunner().invoke(app, ["predict", "--onnx", str(onnx_file), *map(str, files), "--out", str(tmp_path / "onnx"), *common])
    assert by_run.exit_code == 0, by_run.output
    assert by_onnx.exit_code == 0, by_onnx.output
    for stem in ("a", "b"):
        rows_run, rows_onnx = read_rows(tmp_path / "run" / f"{stem}.csv"), read_rows(tmp_path / "onnx" / f"{stem}.csv")
        for a, b in zip(rows_run, rows_onnx, strict=True):
            assert (a["landmark"], a["x_px"], a["y_px"], a["present"]) == (b["landmark"], b["x_px"], b["y_px"], b["present"])
            assert float(a["peak_probability"]) == pytest.approx(float(b["peak_probability"]), abs=1e-5)


def test_export_refuses_to_replace_a_file(run, onnx_file):
    from pelmark.errors import PelmarkError

    with pytest.raises(PelmarkError, match="--overwrite"):
        export_onnx(run, onnx_file)

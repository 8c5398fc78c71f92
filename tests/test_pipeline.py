"""The whole pipeline through the CLI on a tiny phantom pelvis cohort: phantom, synth, four strategies, eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pelmark.cli import app


def _run(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_phantom_to_table1(tmp_path: Path):
    _run("phantom", tmp_path / "cohort", "--subjects", "3", "--spacing", "5", "--novel-subjects", "1", "--no-preview")
    store = tmp_path / "store.zarr"
    _run("synth", tmp_path / "cohort" / "manifest.toml", "--out", store, "--views", "6", "--novel-views", "2",
         "--height", "48", "--pixel-spacing", "6.2", "--scheduler", "sync", "--no-progress")
    tiny = ["--size", "32", "--encoder", "resnet18", "--encoder-depth", "3", "--batch-size", "2", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--no-progress", "--config", tmp_path / "cohort" / "manifest.toml"]
    runs = tmp_path / "runs"
    for strategy in ("baseline", "composite", "pel-only"):
        _run("train", strategy, store, "--out", runs / strategy, *tiny, "--lr", "1e-3")
    _run("train", "finetune", store, "--out", runs / "finetune", *tiny, "--init", runs / "baseline")
    for strategy in ("baseline", "composite", "pel-only", "finetune"):
        status = json.loads((runs / strategy / "run.json").read_text())["status"]
        assert status in ("COMPLETE", "DIV"), (strategy, status)
    # --auto-resume leaves a finished run alone.
    assert "already" in _run("train", "baseline", store, "--out", runs / "baseline", *tiny, "--auto-resume")

    out = tmp_path / "eval"
    printed = _run("eval", *(runs / s for s in ("baseline", "composite", "pel-only", "finetune")), "--store", store,
                   "--out", out, "--no-progress", "--workers", "0")
    assert "novel_view" in printed and "novel_subject" in printed
    with open(out / "table1.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["split", "model", "Mean", *(f"L{i}" for i in range(1, 9))]
    models = [r["model"] for r in rows]
    assert models == ["baseline", "composite", "pel-only", "finetune", "mean-position"] * 2
    for name in ("per_image.csv", "pose.csv", "summary.json", "samples_novel_view.png", "error_cdf.png", "per_landmark_error.png"):
        assert (out / name).is_file(), name

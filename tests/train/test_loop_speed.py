"""pelmark train's speed settings: --compile, heatmap targets drawn on the device, and the CUDA layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cohort_fixtures import write_bead_store
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.train import loop as loop_mod
from pelmark.train.config import RunStatus, Strategy, TrainConfig, resolve_config
from pelmark.train.data import heatmap_targets
from pelmark.train.loop import Distributed, Trainer, check_resume_config

TINY = dict(size=32, encoder="resnet18", encoder_depth=3, batch_size=2, workers=0, device="cpu", checkpoint_every=1, lr=1e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_bead_store(tmp_path_factory.mktemp("cohort"))


def _trainer(store: Path, tmp_path: Path, **changes) -> Trainer:
    config = resolve_config(Strategy.BASELINE, {}, {**TINY, "epochs": 1, **changes})
    return Trainer(config, store, tmp_path / "run", Distributed(0, 1, torch.device(config.device)), progress=False)


def test_compile_comes_from_the_table_or_the_option_and_is_off_by_default(tmp_path):
    assert resolve_config(Strategy.BASELINE).compile is False
    assert resolve_config(Strategy.BASELINE, {"compile": True}).compile is True
    assert resolve_config(Strategy.BASELINE, {"compile": True}, {"compile": False}).compile is False
    with pytest.raises(PelmarkError, match="compile"):
        resolve_config(Strategy.BASELINE, {"compile": "yes"})


def test_a_resume_may_turn_compile_on_or_off_but_not_change_what_is_computed(tmp_path):
    saved = TrainConfig(compile=False)
    check_resume_config(dataclasses.replace(saved, compile=True), saved, tmp_path)
    with pytest.raises(PelmarkError, match="lr"):
        check_resume_config(dataclasses.replace(saved, compile=True, lr=1e-3), saved, tmp_path)


def test_compile_wraps_only_the_training_module(store, tmp_path):
    trainer = _trainer(store, tmp_path, compile=True)
    assert isinstance(trainer.net, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.net._orig_mod is trainer.model  # checkpoints and validation use the plain model
    assert set(trainer.model.state_dict()) == set(_trainer(store, tmp_path).model.state_dict())


def test_the_cli_takes_compile(store, tmp_path, monkeypatch):
    seen = {}

    def fake_train(config, *args, **kwargs):
        seen["compile"] = config.compile
        return loop_mod.RunReport(tmp_path, RunStatus.COMPLETE, 0, float("inf"))

    monkeypatch.setattr(loop_mod, "train", fake_train)
    result = CliRunner().invoke(app, ["train", "baseline", str(store), "--out", str(tmp_path / "run"), "--compile", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert seen == {"compile": True}


def test_targets_drawn_on_the_device_match_the_workers_and_train_the_same_step(store, tmp_path):
    # On CPU the workers build the targets; force the CUDA path (workers read images only) on the CPU.
    workers = _trainer(store, tmp_path)
    batch = next(iter(workers._batches(workers.train_set, [[0, 1]])))
    on_device = _trainer(store, tmp_path)
    on_device.targets_on_device = True
    drawn = on_device._targets(batch)
    assert drawn.shape == batch["heatmap_target"].shape
    # From float32 instead of float64 landmark coordinates: the same maps but for that rounding.
    torch.testing.assert_close(drawn, batch["heatmap_target"], rtol=0, atol=1e-4)
    assert torch.equal(drawn, heatmap_targets(batch["landmarks_px"], batch["visible"], 32, 32, workers.data_settings))
    first, second = workers.step(batch), on_device.step(batch)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5)


@pytest.mark.gpu
def test_cuda_trainer_uses_channels_last_cudnn_autotuning_and_device_targets(store, tmp_path):
    trainer = _trainer(store, tmp_path, device="cuda")
    assert torch.backends.cudnn.benchmark
    assert trainer.targets_on_device and not trainer.train_set.settings.targets
    assert trainer.transforms_on_device  # auto on CUDA: the workers only read (test_device_transforms.py)
    convolution = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(iter(trainer._batches(trainer.train_set, [[0, 1]])))
    assert batch["store_image"].is_pinned() and batch["heatmap_target"].numel() == 0
    targets = trainer._targets({k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)})
    assert targets.device.type == "cuda" and targets.shape == (2, batch["visible"].shape[1], 32, 32)
    row = trainer.step(batch)
    assert torch.isfinite(torch.tensor(row["loss"]))


@pytest.mark.gpu
def test_compiled_cuda_run_completes(store, tmp_path):
    config = resolve_config(Strategy.COMPOSITE, {}, {**TINY, "device": "cuda", "compile": True, "max_steps": 2, "divergence_factor": 1e12})
    report = loop_mod.train(config, store, tmp_path / "run", progress=False)
    assert report.status is RunStatus.COMPLETE

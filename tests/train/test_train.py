"""pelmark train: model pieces, config, the four strategies, resume, divergence and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cohort_fixtures import write_bead_store
from pelmark.cli import app
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera
from pelmark.synth.store import open_store
from pelmark.train import loop as loop_mod
from pelmark.train.checkpoint import checkpoint_path, load_checkpoint, load_run, save_atomic
from pelmark.train.config import RunStatus, Strategy, TrainConfig, resolve_config
from pelmark.train.losses import segmentation_loss, to_reference_pixels
from pelmark.train.metrics import landmark_rmse, mean_rmse
from pelmark.train.model import hard_argmax, soft_argmax

TINY = dict(size=32, encoder="resnet18", encoder_depth=3, batch_size=2, workers=0, device="cpu", checkpoint_every=1, lr=1e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """3 bead subjects (the last novel_subject) x 4 views of 48 x 48: 8 train images."""
    return write_bead_store(tmp_path_factory.mktemp("cohort"))


def _config(strategy: Strategy = Strategy.BASELINE, **changes) -> TrainConfig:
    return resolve_config(strategy, {}, {**TINY, "epochs": 2, **changes})


def _weights(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(run_dir, which))["model"]


# ---------------------------------------------------------------- soft-argmax and metrics


def test_soft_argmax_finds_a_peak_and_hard_argmax_agrees():
    logits = torch.full((1, 2, 9, 12), -20.0)
    logits[0, 0, 3, 7] = 20.0  # row 3, column 7
    logits[0, 1, 5:7, 2] = 20.0  # two pixels: mean row 5.5
    points = soft_argmax(logits, 1.0)
    torch.testing.assert_close(points[0, 0], torch.tensor([7.0, 3.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(points[0, 1], torch.tensor([2.0, 5.5]), atol=1e-4, rtol=0)
    assert hard_argmax(logits)[0, 0].tolist() == [7.0, 3.0]


def test_soft_argmax_of_a_flat_map_is_the_centre_and_temperature_controls_the_gradient():
    flat = torch.zeros(1, 1, 5, 7, requires_grad=True)
    torch.testing.assert_close(soft_argmax(flat, 1.0)[0, 0], torch.tensor([3.0, 2.0]))
    # A sharp map at tiny τ is a hard argmax: (almost) no gradient reaches the logits.
    logits = torch.zeros(1, 1, 5, 7)
    logits[0, 0, 2, 3] = 5.0
    grads = []
    for tau in (1.0, 1e-3):
        x = logits.clone().requires_grad_(True)
        soft_argmax(x, tau)[0, 0, 0].backward()
        grads.append(x.grad.abs().sum().item())
    assert grads[0] > 1e-3 and grads[1] < 1e-12
    with pytest.raises(PelmarkError, match="temperature"):
        soft_argmax(logits, 0.0)


def test_to_reference_pixels_matches_camera_pixels_to():
    store_cam = Camera.centered(48, 48, spacing_mm=2.0)
    crop = store_cam.cropped(4, 6, 36, 36).resized(32, 32)
    reference = store_cam.resized(32, 32)
    points = torch.tensor([[[3.0, 5.0], [20.5, 11.25]]])
    intrinsics = torch.tensor([[crop.fx, crop.fy, crop.cx_px, crop.cy_px, 0, 0, 32, 32]], dtype=torch.float64)
    torch.testing.assert_close(to_reference_pixels(points, intrinsics, reference), crop.pixels_to(reference, points.double()))


def test_landmark_rmse_by_hand():
    predicted = np.array([[[0, 0], [1, 1]], [[3, 4], [5, 5]]], float)
    true = np.zeros((2, 2, 2))
    visible = np.array([[True, True], [True, False]])
    rmse = landmark_rmse(predicted, true, visible)
    # landmark 0: distances 0 and 5 -> sqrt(25/2); landmark 1: only sqrt(2) visible.
    np.testing.assert_allclose(rmse, [math.sqrt(12.5), math.sqrt(2)])
    assert mean_rmse(rmse) == pytest.approx((math.sqrt(12.5) + math.sqrt(2)) / 2)
    assert np.isnan(landmark_rmse(predicted, true, np.zeros((2, 2), bool))).all()


def test_pos_weight_weighs_mask_pixels():
    logits, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0], [0, 0]]]])
    plain = segmentation_loss(logits, target)
    assert plain.item() == pytest.approx(math.log(2))
    assert segmentation_loss(logits, target, 3.0).item() == pytest.approx(math.log(2) * (3 + 3) / 4)


# ---------------------------------------------------------------- config


def test_config_precedence_and_errors(tmp_path):
    table = {"batch_size": 4, "lr": 3e-4, "finetune": {"lr": 1e-5}}
    finetune = resolve_config("finetune", table, {"batch_size": 2, "lr": None})
    assert (finetune.epochs, finetune.batch_size, finetune.lr) == (1, 2, 1e-5)
    baseline = resolve_config("baseline", table, {})
    assert (baseline.epochs, baseline.batch_size, baseline.lr) == (28, 4, 3e-4)
    assert TrainConfig.from_dict(baseline.to_dict()) == baseline
    with pytest.raises(PelmarkError, match="unknown setting 'bogus'"):
        resolve_config("baseline", {"bogus": 1})
    with pytest.raises(PelmarkError, match="unknown strategy"):
        resolve_config("pel", {})
    with pytest.raises(PelmarkError, match="unknown solver"):
        resolve_config("finetune", {}, {"solver": "newton"})


# ---------------------------------------------------------------- runs


def test_baseline_run_writes_what_it_promises(store, tmp_path):
    run = tmp_path / "run"
    report = loop_mod.train(_config(), store, run, progress=False)
    n_train = int((np.asarray(open_store(store)["split"][:]) == 0).sum()) - 1  # one held out for validation
    assert report.status is RunStatus.COMPLETE and report.steps == 2 * (n_train // 2)  # two epochs
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "COMPLETE" and info["config"]["strategy"] == "baseline"
    assert info["store"]["fingerprint"] == open_store(store).attrs["fingerprint"]
    assert info["store"]["train_images"] == n_train and info["store"]["val_images"] == 1
    assert info["landmark_names"] == list(open_store(store).attrs["landmark_names"])
    assert "torch" in info["versions"]
    assert checkpoint_path(run, "last").is_file() and checkpoint_path(run, "best").is_file()
    steps = (run / "metrics_steps.csv").read_text().splitlines()
    assert steps[0].startswith("step,epoch,loss") and len(steps) == report.steps + 1
    assert len((run / "metrics_epochs.csv").read_text().splitlines()) == 3
    loaded = load_run(run)
    assert loaded.status is RunStatus.COMPLETE and not loaded.model.training
    with torch.no_grad():
        assert loaded.model(torch.zeros(1, 1, 32, 32)).shape == (1, len(loaded.landmark_names), 32, 32)


@pytest.mark.parametrize("strategy", [Strategy.COMPOSITE, Strategy.PEL_ONLY])
def test_pel_strategies_run_and_change_the_weights(store, tmp_path, strategy):
    run = tmp_path / strategy.value
    report = loop_mod.train(_config(strategy, epochs=1, max_steps=2, divergence_factor=1e12), store, run, progress=False)
    assert report.status is RunStatus.COMPLETE
    rows = (run / "metrics_steps.csv").read_text().splitlines()[1:]
    pel = [float(r.split(",")[4]) for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in pel)


def test_finetune_starts_from_the_baseline(store, tmp_path):
    base = tmp_path / "base"
    loop_mod.train(_config(epochs=1), store, base, progress=False)
    with pytest.raises(PelmarkError, match="--init"):
        loop_mod.train(_config(Strategy.FINETUNE), store, tmp_path / "nope", progress=False)
    assert not (tmp_path / "nope").exists()
    # max_steps=1 with lr ~ 0: the fine-tuned weights are the baseline's best (BatchNorm statistics move on).
    fine = tmp_path / "fine"
    loop_mod.train(_config(Strategy.FINETUNE, init=str(base), lr=1e-12, max_steps=1), store, fine, progress=False)
    start = _weights(base, "best")
    end = _weights(fine)
    params = [k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    diffs = [float((start[k] - end[k]).abs().max()) for k in params]
    assert max(diffs) < 1e-6
    # An init of another landmark set is refused.
    state = load_checkpoint(checkpoint_path(base, "best"))
    state["landmark_names"] = ["a", "b"]
    other = tmp_path / "other.pt"
    save_atomic(state, other)
    with pytest.raises(PelmarkError, match="landmarks"):
        loop_mod.train(_config(Strategy.FINETUNE, init=str(other)), store, tmp_path / "x", progress=False)


def test_resume_after_a_crash_equals_an_uninterrupted_run(store, tmp_path):
    config = _config(epochs=2, augment=True)
    whole = tmp_path / "whole"
    loop_mod.train(config, store, whole, progress=False)

    crashed = tmp_path / "crashed"

    def crash(step: int) -> None:
        if step == 3:  # mid-way through the second epoch
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        loop_mod.train(config, store, crashed, progress=False, after_step=crash)
    assert json.loads((crashed / "run.json").read_text())["status"] == "RUNNING"
    with pytest.raises(PelmarkError, match="--resume"):
        loop_mod.train(config, store, crashed, progress=False)
    report = loop_mod.train(config, store, crashed, resume=True, progress=False)
    assert report.status is RunStatus.COMPLETE and report.steps == 4
    a, b = _weights(whole), _weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "metrics_steps.csv").read_text().count("\n") == (crashed / "metrics_steps.csv").read_text().count("\n")


def test_a_nan_loss_stops_the_run_with_status_div(store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop_mod.segmentation_loss

    def poisoned(logits, targets, pos_weight=1.0):
        calls["n"] += 1
        value = real(logits, targets, pos_weight)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(loop_mod, "segmentation_loss", poisoned)
    run = tmp_path / "div"
    report = loop_mod.train(_config(), store, run, progress=False)
    assert report.status is RunStatus.DIV and report.steps == 2
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "DIV" and "step 3" in info["reason"] and "non-finite" in info["reason"]
    state = load_checkpoint(checkpoint_path(run, "last"))
    assert state["counters"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_exploding_loss_is_divergence(store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop_mod.segmentation_loss

    def exploding(logits, targets, pos_weight=1.0):
        calls["n"] += 1
        return real(logits, targets, pos_weight) * (1e6 if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(loop_mod, "segmentation_loss", exploding)
    report = loop_mod.train(_config(divergence_warmup=2, divergence_factor=100.0), store, tmp_path / "x", progress=False)
    assert report.status is RunStatus.DIV and "exceeded" in report.reason


def test_micro_batches_equal_the_same_step_in_one_piece_without_batchnorm(store, tmp_path):
    """Accumulating 2 pieces is the gradient of the whole batch when nothing couples the samples (eval-mode BN)."""
    trainer = loop_mod.Trainer(_config(), store, tmp_path / "t", loop_mod.Distributed(0, 1, torch.device("cpu")), False)
    batch = next(iter(trainer._batches(trainer.train_set, [[0, 1, 2, 3]])))
    grads = []
    for pieces in (1, 2):
        trainer.model.eval()
        trainer.optimizer.zero_grad()
        parts = loop_mod._micro_batches(batch, pieces)
        for part in parts:
            loss, _ = trainer._loss(part)
            (loss / len(parts)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- bad input through the CLI


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_bad_inputs_give_one_line_and_exit_1(store, tmp_path):
    base = ["--size", "32", "--encoder", "resnet18", "--encoder-depth", "3", "--batch-size", "2", "--workers", "0",
            "--max-steps", "1", "--no-progress", "--device", "cpu"]
    result = _cli("train", "finetune", store, "--out", tmp_path / "f", *base)
    assert result.exit_code == 1 and "--init" in result.output and len(result.output.strip().splitlines()) == 1

    no_train = tmp_path / "no_train.zarr"
    shutil.copytree(store, no_train)
    group = open_store(no_train, mode="r+")
    group["split"][:] = np.full(group["split"].shape, 1, dtype=group["split"].dtype)
    result = _cli("train", "baseline", no_train, "--out", tmp_path / "b", *base)
    assert result.exit_code == 1 and "no train images" in result.output and not (tmp_path / "b").exists()

    other_version = tmp_path / "v.zarr"
    shutil.copytree(store, other_version)
    group = open_store(other_version, mode="r+")
    group.attrs["format_version"] = 999
    result = _cli("train", "baseline", other_version, "--out", tmp_path / "c", *base)
    assert result.exit_code == 1 and "version" in result.output and len(result.output.strip().splitlines()) == 1

    result = _cli("train", "baseline", tmp_path / "missing.zarr", "--out", tmp_path / "d", *base)
    assert result.exit_code == 1 and "missing.zarr" in result.output

    ok = _cli("train", "baseline", store, "--out", tmp_path / "ok", *base)
    assert ok.exit_code == 0, ok.output
    again = _cli("train", "baseline", store, "--out", tmp_path / "ok", *base)
    assert again.exit_code == 1 and "--resume" in again.output


# ---------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_with_two_micro_batches(store, tmp_path):
    """torchrun, 2 gloo processes x 2 images = one process with a batch of 4 in 2 accumulated pieces.

    Each DDP process normalises its own 2 images (per-process BatchNorm), exactly as the
    2 micro-batches do, so the two runs compute the same steps up to float summation order.
    """
    import os
    import subprocess
    import sys

    args = ["train", "baseline", str(store), "--size", "32", "--encoder", "resnet18", "--encoder-depth", "3",
            "--batch-size", "4", "--workers", "0", "--epochs", "2", "--lr", "1e-3", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pelmark.cli",
         *args, "--out", str(ddp)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "single"
    result = _cli(*args, "--micro-batches", "2", "--out", single)
    assert result.exit_code == 0, result.output
    info = json.loads((ddp / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "COMPLETE"
    assert info["steps"] == json.loads((single / "run.json").read_text())["steps"]
    a, b = _weights(ddp), _weights(single)
    torch.manual_seed(42)  # the run's seed: its initial weights
    start = loop_mod.build_model(loop_mod.ModelSpec(classes=len(info["landmark_names"]), encoder="resnet18", encoder_depth=3))
    # Trained parameters only: BatchNorm running statistics are kept from rank 0 under DDP (its default
    # broadcast_buffers), but updated by both pieces in one process; they affect evaluation, not the steps.
    names = [n for n, p in start.named_parameters() if p.requires_grad]
    initial = dict(start.named_parameters())
    moved = max(float((a[k] - initial[k].detach()).abs().max()) for k in names)
    worst = max(float((a[k] - b[k]).abs().max()) for k in names)
    print(f"largest weight change {moved:.3g}, largest DDP/single difference {worst:.3g}")
    assert moved > 1e-3  # the runs trained
    assert worst < 1e-3 * moved


@pytest.mark.gpu
def test_cuda_run_with_bf16_autocast(store, tmp_path):
    for strategy in (Strategy.BASELINE, Strategy.COMPOSITE):
        report = loop_mod.train(_config(strategy, device="cuda", max_steps=2, divergence_factor=1e12), store, tmp_path / strategy.value, progress=False)
        assert report.status is RunStatus.COMPLETE
        assert json.loads((tmp_path / strategy.value / "run.json").read_text())["device"].startswith("cuda")

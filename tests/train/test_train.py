"""pelmark train: model pieces, config, the four strategies, resume, divergence and bad input."""

from __future__ import annotations

import csv
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
from pelmark.store import open_store
from pelmark.train import loop as loop_mod
from pelmark.train.checkpoint import checkpoint_path, load_checkpoint, load_run, save_atomic
from pelmark.train.config import RunStatus, Strategy, TrainConfig, resolve_config
from pelmark.train.losses import segmentation_loss, to_reference_pixels
from pelmark.train.metrics import landmark_rmse, mean_rmse
from pelmark.train.model import ModelSpec, build_model, hard_argmax, soft_argmax

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
    with pytest.raises(PelmarkError, match="--solver must be one of lm, adam, lbfgs"):
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
    # last.pt resumes (optimiser, scheduler, RNG); best.pt holds the weights alone.
    last, best = load_checkpoint(checkpoint_path(run, "last")), load_checkpoint(checkpoint_path(run, "best"))
    assert {"optimizer", "scheduler", "rng"} <= last.keys() and not {"optimizer", "scheduler", "rng"} & best.keys()
    assert best.keys() >= {"model", "model_spec", "landmark_names", "config"}
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
    with open(run / "metrics_steps.csv", newline="") as handle:
        pel = [float(r["pel_loss"]) for r in csv.DictReader(handle)]
    assert pel and all(math.isfinite(v) and v > 0 for v in pel)
    # The trainer seeds torch with the config's seed before building the model: rebuild those initial weights.
    config = _config(strategy, epochs=1, max_steps=2, divergence_factor=1e12)
    torch.manual_seed(config.seed)
    initial = build_model(ModelSpec(classes=len(load_run(run).landmark_names), encoder=config.encoder, encoder_depth=config.encoder_depth)).state_dict()
    trained = _weights(run)
    changed = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert any("decoder" in k for k in changed) and any("encoder" in k for k in changed)


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


# ---------------------------------------------------------------- safety (issue 14)


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_not_run(store, tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    loop_mod.train(_config(epochs=1, max_steps=1), store, run, progress=False)
    evil = {"format": "pelmark-checkpoint", "model": _RunsCode(marker)}
    torch.save(evil, checkpoint_path(run, "best"))
    with pytest.raises(PelmarkError, match="convert-checkpoint") as caught:
        load_checkpoint(run)
    assert caught.value.path == checkpoint_path(run, "best") and "\n" not in str(caught.value)
    for args in (["eval", run, "--store", store, "--out", tmp_path / "results", "--device", "cpu", "--workers", "0"],
                 ["train", "finetune", store, "--out", tmp_path / "fine", "--init", run, "--device", "cpu", "--workers", "0",
                  "--size", "32", "--encoder", "resnet18", "--encoder-depth", "3", "--no-progress"]):  # fmt: skip
        result = _cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {checkpoint_path(run, 'best')}: refusing to unpickle")
        assert "pelmark convert-checkpoint OLD NEW --trust" in lines[0]
    assert not marker.exists()


def test_checkpoint_rng_states_round_trip_bit_exactly(tmp_path):
    import random

    from pelmark.train.checkpoint import rng_state, set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    path = tmp_path / "c.pt"
    save_atomic({"format": "pelmark-checkpoint", "rng": rng_state()}, path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_an_earlier_checkpoint_is_refused_then_converted_with_trust(store, tmp_path):
    import random

    run = tmp_path / "run"
    loop_mod.train(_config(epochs=1, max_steps=1), store, run, progress=False)
    state = load_checkpoint(checkpoint_path(run, "last"))
    # What pelmark wrote before: the RNG states as Python tuples holding a NumPy array.
    state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state["counters"]["best_val_rmse_px"] = np.float64(state["counters"]["best_val_rmse_px"])
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(state, old)
    with pytest.raises(PelmarkError, match="convert-checkpoint"):
        load_checkpoint(old)
    refused = _cli("convert-checkpoint", old, new)
    assert refused.exit_code == 1 and "--trust" in refused.stderr and not new.exists()
    converted = _cli("convert-checkpoint", old, new, "--trust")
    assert converted.exit_code == 0, converted.output
    loaded = load_checkpoint(new)
    assert all(torch.equal(loaded["model"][k], state["model"][k]) for k in state["model"])
    expected = (random.random(), np.random.standard_normal(2).tolist())
    from pelmark.train.checkpoint import set_rng_state

    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.standard_normal(2).tolist()) == expected


def test_overwrite_removes_the_old_runs_checkpoints_before_the_new_run(store, tmp_path):
    """Regression (issue 14): an --overwrite run killed before its first checkpoint was later
    auto-resumed from the previous run's last.pt, at the old learning rate."""
    run = tmp_path / "run"
    loop_mod.train(_config(epochs=1, lr=1e-3), store, run, progress=False)
    (run / "notes.txt").write_text("mine")

    def killed(step: int) -> None:
        raise KeyboardInterrupt

    new = _config(epochs=1, lr=1e-4, checkpoint_every=0)  # no checkpoint before the epoch's end
    with pytest.raises(KeyboardInterrupt):
        loop_mod.train(new, store, run, overwrite=True, progress=False, after_step=killed)
    assert not checkpoint_path(run, "last").exists() and not checkpoint_path(run, "best").exists()
    assert json.loads((run / "run.json").read_text())["config"]["lr"] == 1e-4
    assert len((run / "metrics_steps.csv").read_text().splitlines()) == 2  # the header and the new run's step
    assert (run / "notes.txt").read_text() == "mine"
    assert loop_mod.existing_run_state(run) is None  # --auto-resume starts it again instead of resuming
    config_file = _train_toml(tmp_path / "train.toml", **{**TINY, "lr": 1e-4, "checkpoint_every": 0, "epochs": 1})
    result = _cli("train", "baseline", store, "--out", run, "--config", config_file, "--auto-resume", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = (run / "metrics_steps.csv").read_text().splitlines()
    assert {row.split(",")[STEP_LR] for row in rows[1:]} == {"0.0001"}


STEP_LR = loop_mod.STEP_FIELDS.index("lr")


def _train_toml(path: Path, **values) -> Path:
    path.write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_resume_with_other_settings_is_refused(store, tmp_path):
    table = {**TINY, "lr": 0.001, "epochs": 2}
    config_file = _train_toml(tmp_path / "train.toml", **table)
    run = tmp_path / "run"
    base = ["train", "baseline", store, "--out", run, "--config", config_file, "--no-progress"]
    config = resolve_config(Strategy.BASELINE, table)

    def crash(step: int) -> None:
        if step == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        loop_mod.train(config, store, run, progress=False, after_step=crash)
    before = (run / "run.json").read_text(), checkpoint_path(run, "last").read_bytes()
    for flag in ("--resume", "--auto-resume"):
        result = _cli(*base, flag, "--lr", "1e-4", "--batch-size", "4")
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
            f"error: {run}: --resume with settings that differ from the run's: batch_size 2 (run) vs 4 (now), "
            "lr 0.001 (run) vs 0.0001 (now); pass the run's settings or --overwrite"
        ], result.output
    with pytest.raises(PelmarkError, match=r"strategy baseline \(run\) vs composite \(now\)"):
        loop_mod.train(dataclasses.replace(config, strategy=Strategy.COMPOSITE), store, run, resume=True, progress=False)
    assert ((run / "run.json").read_text(), checkpoint_path(run, "last").read_bytes()) == before
    # The same settings (as make passes them), with other runtime settings and a longer run, resume.
    result = _cli(*base, "--auto-resume", "--workers", "1", "--epochs", "3")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "COMPLETE" and info["config"]["lr"] == 0.001 and info["config"]["epochs"] == 3


def test_a_stale_last_checkpoint_is_not_resumed(store, tmp_path):
    other = tmp_path / "other"
    loop_mod.train(_config(epochs=1, max_steps=1, lr=1e-2), store, other, progress=False)
    run = tmp_path / "run"

    def crash(step: int) -> None:
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        loop_mod.train(_config(), store, run, progress=False, after_step=crash)
    shutil.copy(checkpoint_path(other, "last"), checkpoint_path(run, "last"))
    with pytest.raises(PelmarkError, match=r"lr 0.01 \(checkpoint\) vs 0.001 \(run\).*--overwrite") as caught:
        loop_mod.train(_config(), store, run, resume=True, progress=False)
    assert caught.value.path == checkpoint_path(run, "last")


def test_out_must_not_be_an_input_nor_a_folder_of_other_files(store, tmp_path):
    base = loop_mod.train(_config(epochs=1, max_steps=1), store, tmp_path / "base", progress=False).run_dir
    store_files = sorted(p.relative_to(store) for p in store.rglob("*"))
    for out, config in ((store, _config()), (base, _config(Strategy.FINETUNE, init=str(base))),
                        (tmp_path, _config(Strategy.FINETUNE, init=str(base / "checkpoints" / "best.pt")))):  # fmt: skip
        for overwrite in (False, True):
            with pytest.raises(PelmarkError, match="--out must not be") as caught:
                loop_mod.train(config, store, out, overwrite=overwrite, progress=False)
            assert caught.value.path == out
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == store_files
    assert checkpoint_path(base, "best").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(PelmarkError, match="not a pelmark run folder"):
            loop_mod.train(_config(), store, precious, overwrite=overwrite, progress=False)
    (precious / "run.json").write_text('{"format": "something else"}')
    with pytest.raises(PelmarkError, match="pelmark did not write"):
        loop_mod.train(_config(), store, precious, overwrite=True, progress=False)
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt", "run.json"]
    result = _cli("train", "baseline", store, "--out", store, "--overwrite", "--no-progress")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1 and str(store) in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert loop_mod.train(_config(epochs=1, max_steps=1), store, empty, progress=False).status is RunStatus.COMPLETE


# ---------------------------------------------------------------- issue 14: refused before training


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("batch_size = 2.5", "[train] batch_size must be an integer >= 1, got 2.5"),
        ('seed = "x"', '[train] seed must be an integer >= 0, got "x"'),
        ('augment = "false"', '[train] augment must be one of none, basic, realistic (in a TOML file also true = basic, false = none), got "false"'),
        ('[train.finetune]\nlr = "1e-5"', '[train.finetune] lr must be a number > 0, got "1e-5"'),
    ],
)
def test_a_bad_train_setting_is_one_line_naming_key_and_file(store, tmp_path, line, message):
    """Regression: these gave tracebacks, or (augment = "false") trained with augmentation on."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(f"[train]\nepochs = 1\n{line}\n")
    run = tmp_path / "run"
    result = _cli("train", "baseline", store, "--out", run, "--config", config_file, "--no-progress")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [f"error: {config_file}: {message}"], result.output
    assert not run.exists()


def test_an_incomplete_store_is_refused_unless_allowed(store, tmp_path):
    """Regression: a store whose synth was interrupted trained on the finished subjects only, without a word."""
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    open_store(partial, mode="r+")["subject_done"][1] = False
    options = ["--size", "32", "--encoder", "resnet18", "--encoder-depth", "3", "--batch-size", "2", "--workers", "0",
               "--max-steps", "1", "--no-progress", "--device", "cpu"]
    run = tmp_path / "run"
    result = _cli("train", "baseline", partial, "--out", run, *options)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {partial}: store is incomplete (synth was interrupted): 1 of 3 subjects not rendered; "
        "run the same pelmark synth again to finish it, or pass --allow-incomplete to use what is there"
    ], result.output
    assert not run.exists()
    result = _cli("train", "baseline", partial, "--out", run, *options, "--allow-incomplete")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [f"warning: {partial}: subject 'b1' (train) was not rendered: its 4 images are missing"]


@pytest.mark.parametrize("strategy", [Strategy.COMPOSITE, Strategy.PEL_ONLY, Strategy.FINETUNE])
def test_pel_on_fewer_than_four_landmarks_is_refused(store, tmp_path, strategy):
    """Regression: PEL on a store of 3 landmarks trained with a PEL of 0 at every step."""
    three = tmp_path / "three.zarr"
    shutil.copytree(store, three)
    open_store(three, mode="r+").attrs["landmark_names"] = ["A", "B", "C"]
    run = tmp_path / "run"
    result = _cli("train", strategy.value, three, "--out", run, "--no-progress", "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {three}: {strategy.value} trains with PEL, which registers a pose from at least 4 landmarks; "
        "the store has 3 (A, B, C): train the baseline, or synthesise more landmarks"
    ], result.output
    assert not run.exists()


def test_a_run_resumed_at_an_epochs_end_logs_that_epochs_loss(store, tmp_path):
    """Regression: resumed from a checkpoint written at the epoch's last step, metrics_epochs.csv had train_loss = nan."""
    config = _config(epochs=2)
    whole = tmp_path / "whole"
    loop_mod.train(config, store, whole, progress=False)
    crashed = tmp_path / "crashed"

    def crash(step: int) -> None:
        if step == 2:  # the first epoch's last step, after its checkpoint and before the epoch's row
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        loop_mod.train(config, store, crashed, progress=False, after_step=crash)
    loop_mod.train(config, store, crashed, resume=True, progress=False)

    def epochs(run: Path) -> list[tuple[str, str, str, str]]:
        with open(run / "metrics_epochs.csv", newline="") as handle:
            return [(r["epoch"], r["step"], r["train_loss"], r["val_rmse_px"]) for r in csv.DictReader(handle)]

    assert len(epochs(whole)) == 2 and all(math.isfinite(float(row[2])) for row in epochs(whole))
    assert epochs(crashed) == epochs(whole)


def test_unused_encoder_stages_are_removed_and_old_checkpoints_still_load(store, tmp_path):
    from pelmark.train.model import ModelSpec, build_model

    # smp builds ResNet-18's four stages at depth 3 but runs only two: the other two are removed.
    spec = ModelSpec(classes=3, encoder="resnet18", encoder_depth=3)
    model = build_model(spec)
    assert not any(k.startswith(("encoder.layer3.", "encoder.layer4.")) for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    # The same seed gives the same weights as the full smp model did (the stages are drawn, then removed).
    torch.manual_seed(0)
    pruned = build_model(spec).state_dict()
    torch.manual_seed(0)
    import segmentation_models_pytorch as smp

    full = smp.Unet(encoder_name="resnet18", encoder_depth=3, encoder_weights=None, decoder_channels=spec.decoder_widths,
                    in_channels=1, classes=3).state_dict()  # fmt: skip
    assert all(torch.equal(pruned[k], full[k]) for k in pruned)
    # A run written before the removal holds the unused stages in its checkpoints; it loads, and predicts the same.
    run = tmp_path / "run"
    loop_mod.train(_config(epochs=1, max_steps=1), store, run, progress=False)
    path = checkpoint_path(run, "best")
    state = load_checkpoint(path)
    old = {**full, **state["model"]}
    assert old.keys() > state["model"].keys()
    save_atomic({**state, "model": old}, path)
    loaded = load_run(run)
    assert all(torch.equal(loaded.model.state_dict()[k], state["model"][k]) for k in state["model"])
    # A checkpoint that lacks a weight the model uses is still refused.
    del old["encoder.conv1.weight"]
    save_atomic({**state, "model": old}, path)
    with pytest.raises(PelmarkError, match="weights do not fit the model: missing encoder.conv1.weight") as caught:
        load_run(run)
    assert caught.value.path == path and "\n" not in str(caught.value)

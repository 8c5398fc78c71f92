"""PEL's options beyond the paper: the local soft-argmax, the reprojection loss, the combined fine-tune,
the warm-up schedule, the decoder width and the per-step diagnostics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from cohort_fixtures import write_bead_store
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera, project
from pelmark.registration import PoseLoss, pose_loss, reprojection_loss
from pelmark.train.config import Schedule, SoftArgmax, Strategy, resolve_config
from pelmark.train.loop import lr_factor, train
from pelmark.train.model import ModelSpec, build_model, hard_argmax, heatmap_diagnostics, local_soft_argmax, soft_argmax

TINY = dict(size=32, encoder="resnet18", encoder_depth=3, batch_size=2, workers=0, device="cpu", checkpoint_every=1, lr=1e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_bead_store(tmp_path_factory.mktemp("cohort"))


# ---------------------------------------------------------------- local soft-argmax


def test_local_soft_argmax_ignores_mass_outside_its_window():
    logits = torch.zeros(1, 1, 20, 20)
    logits[0, 0, 5, 6] = 4.0  # the peak: row 5, column 6
    logits[0, 0, 15:, 15:] = 3.9  # a large bright area far away pulls the global soft-argmax
    glob = soft_argmax(logits, 1.0)[0, 0]
    local = local_soft_argmax(logits, 2, 1.0)[0, 0]
    assert (glob - torch.tensor([6.0, 5.0])).norm() > 5.0
    # Inside the 5x5 window: one pixel of weight e^4, 24 of weight 1; the centroid is the peak by symmetry.
    torch.testing.assert_close(local, torch.tensor([6.0, 5.0]))


def test_local_soft_argmax_hand_value_and_gradient_stay_in_the_window():
    logits = torch.full((1, 1, 9, 9), -30.0)
    logits[0, 0, 4, 4] = math.log(3.0)
    logits[0, 0, 4, 5] = 0.0  # weights 3 : 1 on columns 4 and 5 -> x = 4.25
    logits[0, 0, 0, 0] = -1.0  # outside the radius-1 window
    x = logits.clone().requires_grad_(True)
    point = local_soft_argmax(x, 1, 1.0)[0, 0]
    torch.testing.assert_close(point, torch.tensor([4.25, 4.0]), atol=1e-5, rtol=0)
    point[0].backward()
    assert x.grad[0, 0, 3:6, 3:6].abs().sum() > 0
    outside = x.grad[0, 0].clone()
    outside[3:6, 3:6] = 0
    assert outside.abs().max() == 0


def test_local_soft_argmax_at_the_border_and_bad_arguments():
    logits = torch.zeros(2, 1, 6, 7)
    logits[0, 0, 0, 0] = 10.0
    logits[1, 0, 5, 6] = 10.0
    points = local_soft_argmax(logits, 3, 0.5)
    # Pixels of the window outside the image get no weight, so the point stays inside and near the corner.
    assert points[0, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    assert points[1, 0].tolist() == pytest.approx([6.0, 5.0], abs=1e-3)
    with pytest.raises(PelmarkError, match="radius"):
        local_soft_argmax(logits, 0)
    with pytest.raises(PelmarkError, match="temperature"):
        local_soft_argmax(logits, 2, 0.0)


def test_local_points_never_leave_the_window_of_the_hard_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 16, 16) * 3
    distance = (local_soft_argmax(logits, 2, 1.0) - hard_argmax(logits)).abs()
    assert distance.max() <= 2.0 + 1e-5


def test_heatmap_diagnostics_by_hand():
    logits = torch.full((1, 2, 11, 11), -50.0)
    logits[0, 0, 5, 5] = 2.0
    logits[0, 1, 1, 1] = 0.5
    points = torch.tensor([[[5.0, 5.0], [4.0, 5.0]]])  # the second is 5 px from its argmax (1, 1)
    values = heatmap_diagnostics(logits, points, torch.tensor([[True, True]]))
    assert values["soft_hard_px"] == pytest.approx(2.5)
    assert values["peak_logit"] == pytest.approx(1.25)
    assert values["mass_5px"] == pytest.approx(1.0, abs=1e-6)  # all the mass sits on the peaks
    only_first = heatmap_diagnostics(logits, points, torch.tensor([[True, False]]))
    assert only_first["soft_hard_px"] == pytest.approx(0.0)
    assert math.isnan(heatmap_diagnostics(logits, points, torch.tensor([[False, False]]))["peak_logit"])


# ---------------------------------------------------------------- reprojection loss


def test_reprojection_loss_by_hand_and_at_equality():
    camera = Camera.centered(64, 64, spacing_mm=1.0)
    points = torch.zeros(1, 1, 3, dtype=torch.float64)  # the isocentre: depth = sid
    pose_true = torch.zeros(1, 6, dtype=torch.float64)
    shifted = pose_true.clone()
    shifted[0, 3] = 2.0  # 2 mm along the world x axis, perpendicular to the AP ray through the isocentre
    expected = camera.fx * 2.0 / camera.sid_mm
    assert float(reprojection_loss(shifted, pose_true, points, camera)) == pytest.approx(expected, rel=1e-9)
    moved = project(points, shifted, camera) - project(points, pose_true, camera)
    assert float(moved.norm()) == pytest.approx(expected, rel=1e-9)
    estimate = pose_true.clone().requires_grad_(True)
    loss = pose_loss(PoseLoss.REPROJECTION, estimate, pose_true, points, camera)
    loss.backward()
    assert float(loss) == 0.0 and torch.isfinite(estimate.grad).all()
    with pytest.raises(PelmarkError, match="camera"):
        pose_loss(PoseLoss.REPROJECTION, shifted, pose_true, points)


# ---------------------------------------------------------------- schedule, decoder, config


def test_warmup_then_cosine_by_hand():
    assert lr_factor(0, 100, 10, Schedule.COSINE) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, Schedule.COSINE) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, Schedule.COSINE) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, Schedule.COSINE) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, Schedule.COSINE) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 100, 0, Schedule.CONSTANT) == 1.0
    assert lr_factor(2, 100, 4, Schedule.CONSTANT) == pytest.approx(0.75)


def test_decoder_channels_build_round_trip_and_errors():
    spec = ModelSpec(classes=3, encoder="resnet18", encoder_depth=3, decoder_channels=[32, 16, 8])
    assert spec.decoder_channels == (32, 16, 8)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    model = build_model(spec).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    assert ModelSpec(classes=3, encoder_depth=3).decoder_widths == (256, 128, 64)
    # A shallower encoder takes the first widths, as with smp's defaults (a manifest's widths survive --encoder-depth).
    assert ModelSpec(classes=3, encoder_depth=3, decoder_channels=(64, 32, 16, 8)).decoder_widths == (64, 32, 16)
    with pytest.raises(PelmarkError, match="decoder_channels"):
        ModelSpec(classes=3, encoder_depth=3, decoder_channels=(32, 16))
    with pytest.raises(PelmarkError, match="decoder_channels"):
        resolve_config("baseline", {"decoder_channels": [32, 16.5, 8], "encoder_depth": 3})


def test_bce_and_pel_weights_by_strategy():
    assert resolve_config("baseline").bce == 1.0 and resolve_config("baseline").pel == 0.0
    assert resolve_config("finetune").bce == 0.0 and resolve_config("finetune").pel == 1.0
    combined = resolve_config("finetune", {"bce_weight": 1.0, "pel_weight": 0.1, "soft_argmax": "local"})
    assert (combined.bce, combined.pel, combined.soft_argmax) == (1.0, 0.1, SoftArgmax.LOCAL)
    with pytest.raises(PelmarkError, match="soft_argmax"):
        resolve_config("finetune", {"soft_argmax": "nearby"})


# ---------------------------------------------------------------- the combined fine-tune, end to end


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_combined_finetune_logs_both_losses_and_the_diagnostics(store, tmp_path):
    base = tmp_path / "base"
    train(resolve_config(Strategy.BASELINE, {}, {**TINY, "epochs": 1}), store, base, progress=False)
    config = resolve_config(
        Strategy.FINETUNE,
        {"bce_weight": 1.0, "pel_weight": 0.5, "soft_argmax": "local", "soft_argmax_radius": 2, "pose_loss": "reprojection"},
        {**TINY, "epochs": 1, "init": str(base)},
    )
    train(config, store, tmp_path / "ft", progress=False)
    rows = _read(tmp_path / "ft" / "metrics_steps.csv")
    assert rows and all(r["seg_loss"] and r["pel_loss"] for r in rows)
    used = [r for r in rows if int(r["pel_used"]) > 0]
    assert used, "no step registered a pose"
    for r in used:
        # The local window keeps the registered points within its radius of the argmax.
        assert 0.0 <= float(r["soft_hard_px"]) <= 2.0 * math.sqrt(2) + 1e-6
        assert float(r["pel_logit_grad_norm"]) > 0.0
        assert float(r["loss"]) == pytest.approx(float(r["seg_loss"]) + 0.5 * float(r["pel_loss"]), rel=1e-4)


# ---------------------------------------------------------------- spatial-softmax cross-entropy


def test_spatial_softmax_loss_by_hand():
    from pelmark.train.losses import spatial_softmax_loss

    targets = torch.zeros(1, 2, 4, 4)
    targets[0, 0, 1, 2] = 1.0
    targets[0, 1, 0, 0] = 1.0
    flat = torch.zeros(1, 2, 4, 4)
    visible = torch.tensor([[True, False]])
    # A flat heatmap puts 1/16 on the target pixel; the invisible landmark weighs 0.
    assert float(spatial_softmax_loss(flat, targets, visible)) == pytest.approx(math.log(16.0))
    sharp = flat.clone()
    sharp[0, 0, 1, 2] = 30.0
    assert float(spatial_softmax_loss(sharp, targets, visible)) == pytest.approx(0.0, abs=1e-9)
    # A target spread over two pixels is normalised: the loss is the cross-entropy against (1/2, 1/2).
    spread = torch.zeros(1, 1, 4, 4)
    spread[0, 0, 0, :2] = 0.5
    assert float(spatial_softmax_loss(torch.zeros(1, 1, 4, 4), spread, torch.tensor([[True]]))) == pytest.approx(math.log(16.0))
    nothing = spatial_softmax_loss(flat.requires_grad_(True), targets, torch.tensor([[False, False]]))
    nothing.backward()
    assert float(nothing) == 0.0 and float(flat.grad.abs().sum()) == 0.0


def test_finetune_defaults_to_the_global_soft_argmax_and_the_reprojection_loss():
    from pelmark.registration import PoseLoss

    config = resolve_config("finetune")
    assert (config.soft_argmax, config.pose_loss) == (SoftArgmax.GLOBAL, PoseLoss.REPROJECTION)
    paper = resolve_config("finetune", {"soft_argmax": "global", "pose_loss": "paper"})
    assert (paper.soft_argmax, paper.pose_loss) == (SoftArgmax.GLOBAL, PoseLoss.PAPER)
    assert resolve_config("composite").soft_argmax is SoftArgmax.GLOBAL

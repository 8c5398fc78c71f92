"""The flip test: mirror orders of landmark sets and outputs, and the averaged logits, by hand."""

from __future__ import annotations

import pytest
import torch

from pelmark.errors import PelmarkError
from pelmark.landmark_sets import DEEPFLUORO_LANDMARKS, PAPER_LANDMARKS, SEED003_CLASSES, mirror_order
from pelmark.train.model import choose_flip_order, flip_test, output_mirror_order


def test_mirror_order_of_the_paper_and_deepfluoro_sets():
    # ASIS-l IOF-l MOF-l SPS IPS MOF-r IOF-r ASIS-r: the sides swap, SPS and IPS (midline) stay.
    assert mirror_order(PAPER_LANDMARKS) == (7, 6, 5, 3, 4, 2, 1, 0)
    order = mirror_order(DEEPFLUORO_LANDMARKS)
    assert [DEEPFLUORO_LANDMARKS[k] for k in order][:4] == ["FH-r", "FH-l", "GSN-r", "GSN-l"]
    assert all(order[order[k]] == k for k in range(len(order)))  # an involution


def test_mirror_order_is_case_insensitive_and_refuses_what_it_cannot_mirror():
    assert mirror_order(["asis-L", "ASIS-r", "Coccyx"]) == (1, 0, 2)
    assert mirror_order(["A", "B", "C"]) is None  # nothing says which are lateral
    with pytest.raises(PelmarkError, match="'FH-l' has no mirror partner 'fh-r'"):
        mirror_order(["FH-l", "SPS"])
    with pytest.raises(PelmarkError, match="repeat"):
        mirror_order(["A-l", "a-L", "A-r"])


def test_output_mirror_order_keeps_the_background_and_swaps_the_bones():
    # 8 landmarks, then background (8) and the six classes of seed 003 (9..14):
    # hemipelvis-l <-> -r (9, 10), femur-l <-> -r (11, 12), vertebrae (13) and upper-sacrum (14) stay.
    assert output_mirror_order(PAPER_LANDMARKS, SEED003_CLASSES) == (7, 6, 5, 3, 4, 2, 1, 0, 8, 10, 9, 12, 11, 13, 14)
    assert output_mirror_order(PAPER_LANDMARKS, ("bone",)) == (7, 6, 5, 3, 4, 2, 1, 0, 8, 9)
    assert output_mirror_order(("A", "B")) is None


def test_choose_flip_order_auto_off_and_forced():
    assert choose_flip_order(PAPER_LANDMARKS) == ((7, 6, 5, 3, 4, 2, 1, 0), None)
    assert choose_flip_order(PAPER_LANDMARKS, asked=False) == (None, None)
    order, why = choose_flip_order(("A", "B"))
    assert order is None and "no landmark name ends in -l or -r" in why
    with pytest.raises(PelmarkError, match="no flip test"):
        choose_flip_order(("A", "B"), asked=True)
    with pytest.raises(PelmarkError, match="no mirror partner"):
        choose_flip_order(("X-l", "Y"), asked=True)


def test_flip_test_by_hand():
    # A "model" that copies the image into channel 0 and leaves channel 1 at zero, with channels
    # 0 and 1 mirror partners: the mirror pass puts the mirrored-back image into channel 1, so
    # the flip test gives half the image in each channel.
    image = torch.arange(12.0).reshape(1, 1, 3, 4)

    def forward(x):
        return torch.cat([x, torch.zeros_like(x)], dim=1)

    out = flip_test(forward, image, (1, 0))
    assert torch.equal(out, torch.cat([image, image], dim=1) * 0.5)
    # Without a partner swap (order (0, 1)) the mirror pass adds nothing new: the image again.
    assert torch.equal(flip_test(forward, image, (0, 1))[:, 0], image[:, 0])


def test_a_mirror_equivariant_model_is_unchanged_by_the_flip_test():
    # Channel 0 sees the image's left half, channel 1 its right half: mirroring the image
    # swaps what they see, so with the order (1, 0) both passes agree exactly.
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 5, 6, generator=generator)
    left = torch.zeros(5, 6)
    left[:, :3] = 1.0

    def forward(x):
        return torch.cat([x * left, x * left.flip(-1)], dim=1)

    assert torch.allclose(flip_test(forward, image, (1, 0)), forward(image))


def test_the_flip_test_halves_a_false_peak_that_only_one_pass_sees():
    # Landmark logits on a 1 x 5 row: the true peak at column 1 in both passes (its mirror is
    # column 3), a stronger false peak at column 4 only in the direct pass.
    direct = torch.tensor([[[[0.0, 4.0, 0.0, 0.0, 5.0]]]])
    mirror_of_image = torch.tensor([[[[0.0, 0.0, 0.0, 4.0, 0.0]]]])  # the mirror pass's logits

    def forward(x):
        return direct if torch.equal(x, image) else mirror_of_image

    image = torch.zeros(1, 1, 1, 5)
    image[..., 0] = 1.0  # any non-symmetric image tells the passes apart
    out = flip_test(forward, image, (0,))
    assert torch.equal(out, torch.tensor([[[[0.0, 4.0, 0.0, 0.0, 2.5]]]]))
    assert int(out.flatten().argmax()) == 1  # the single pass's argmax was column 4


def test_together_is_the_same_flip_test_in_one_call():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(3, 1, 4, 5, generator=generator)
    weights = torch.rand(2, 4, 5, generator=generator)
    calls = []

    def forward(x):
        calls.append(len(x))
        return x * weights

    apart = flip_test(forward, image, (1, 0))
    together = flip_test(forward, image, (1, 0), together=True)
    assert torch.allclose(apart, together) and calls == [3, 3, 6]


def test_training_on_the_flip_test(tmp_path):
    from cohort_fixtures import write_bead_store
    from pelmark.store import open_store
    from pelmark.train.checkpoint import load_run
    from pelmark.train.config import Strategy, TrainConfig
    from pelmark.train.loop import train

    store = write_bead_store(tmp_path / "cohort")
    config = TrainConfig(
        strategy=Strategy.BASELINE, size=32, encoder="resnet18", encoder_depth=3, batch_size=2, max_steps=1,
        workers=0, device="cpu", checkpoint_every=0, flip_test=True,
    )  # fmt: skip
    # The bead store's landmarks A..E have no sides: one line, before any output.
    with pytest.raises(PelmarkError, match="flip_test: no flip test: no landmark name ends in -l or -r"):
        train(config, store, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    open_store(store, mode="r+").attrs["landmark_names"] = ["A-l", "B", "C", "D", "A-r"]
    train(config, store, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.config.flip_test and run.model is not None

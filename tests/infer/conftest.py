"""Session fixtures of the pelmark.infer tests: a bead store of integer images, a run trained on it, eval's predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cohort_fixtures import write_bead_store
from pelmark.evaluate.predict import predict_split, read_truth
from pelmark.store import Split, open_store
from pelmark.train.checkpoint import load_run
from pelmark.train.config import Strategy, TrainConfig
from pelmark.train.loop import train
from xray_fixtures import LEVELS, SIZE



@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """The bead cohort and its store, whose images are quantised to integers (exact in float16, PNG and DICOM)."""
    root = tmp_path_factory.mktemp("cohort")
    store = write_bead_store(root)
    group = open_store(store, mode="r+")
    images = np.asarray(group["images"][:], dtype=np.float64)
    group["images"][:] = np.round(images / images.max() * LEVELS).astype(np.float16)
    return root


@pytest.fixture(scope="session")
def store(cohort) -> Path:
    return cohort / "store.zarr"


@pytest.fixture(scope="session")
def run(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(
        strategy=Strategy.BASELINE, size=SIZE, encoder="resnet18", encoder_depth=3, batch_size=2, max_steps=2,
        workers=0, device="cpu", checkpoint_every=0,
    )  # fmt: skip
    train(config, store, out, progress=False)
    return out


@pytest.fixture(scope="session")
def evaluated(store, run):
    """eval's predictions (model px) on the novel_subject split, and the store's camera."""
    truth = read_truth(store, Split.NOVEL_SUBJECT, SIZE)
    predictions = predict_split(load_run(run), store, truth, workers=0, progress=False)
    return predictions

"""Typed settings (issue 14, item 5): every key of [synth], [train], [train.<strategy>] and [dataset], and the
command-line options, is checked for its type and range, with no coercion, in one line naming the key and the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pelmark.errors import PelmarkError
from pelmark.synth.settings import SynthSettings, resolve_settings
from pelmark.train.augment import Augment
from pelmark.train.config import TrainConfig, resolve_config
from pelmark.validation import DatasetTable, SynthTable, TrainTable, check, describe

MANIFEST = Path("cohort/manifest.toml")


def test_each_model_has_exactly_its_dataclass_fields():
    assert set(SynthTable.model_fields) == {f.name for f in dataclasses.fields(SynthSettings)}
    assert set(TrainTable.model_fields) == {f.name for f in dataclasses.fields(TrainConfig)} - {"strategy"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"views": 6.5}, "[synth] views must be an integer >= 1, got 6.5"),
        ({"views": True}, "[synth] views must be an integer >= 1, got true"),
        ({"views": "ten"}, '[synth] views must be an integer >= 1, got "ten"'),
        ({"views": "10"}, '[synth] views must be an integer >= 1, got "10"'),
        ({"seed": "0"}, '[synth] seed must be an integer >= 0, got "0"'),
        ({"compile": "false"}, '[synth] compile must be true or false, got "false"'),
        ({"pixel_spacing": 0}, "[synth] pixel_spacing must be a number > 0, got 0"),
        ({"sdd": float("nan")}, "[synth] sdd must be a number > 0, got NaN"),
        ({"view": "lateral"}, '[synth] view must be one of ap, pa, got "lateral"'),
        ({"scheduler": "cluster"}, '[synth] scheduler must be local, sync, or a scheduler address such as tcp://HOST:PORT, got "cluster"'),
        ({"n-points": 1}, "[synth] n-points must be an integer >= 2, got 1"),
        ({"vews": 3}, "[synth] has an unknown setting 'vews'"),
    ],
)
def test_a_bad_synth_table_names_the_key_and_the_manifest(table, message):
    with pytest.raises(PelmarkError) as info:
        resolve_settings(table, {}, MANIFEST)
    assert str(info.value).startswith(f"{MANIFEST}: {message}")


def test_a_bad_option_is_named_as_the_option_not_blamed_on_the_manifest():
    with pytest.raises(PelmarkError) as info:
        resolve_settings({}, {"threads": -1, "views": None}, MANIFEST)
    assert str(info.value) == "--threads must be an integer >= 1, got -1"


def test_strings_are_never_read_as_numbers_or_booleans():
    """Regression: seed = "0" gave other poses than seed = 0, and augment = "false" was read as true."""
    assert resolve_settings({"seed": 0}, {}).seed == 0
    with pytest.raises(PelmarkError, match=r'seed must be an integer >= 0, got "0"'):
        resolve_settings({"seed": "0"}, {})
    with pytest.raises(PelmarkError, match=r'\[train\] augment must be one of none, basic, realistic .*, got "false"'):
        resolve_config("baseline", {"augment": "false"}, {}, MANIFEST)
    assert resolve_config("baseline", {"augment": False}, {}).augment is Augment.NONE
    assert resolve_config("baseline", {"lr": 1}, {}).lr == 1.0  # a TOML integer is a number


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"batch_size": 2.5}, "[train] batch_size must be an integer >= 1, got 2.5"),
        ({"seed": "x"}, '[train] seed must be an integer >= 0, got "x"'),
        ({"val_fraction": 1.0}, "[train] val_fraction must be a number >= 0 and < 1, got 1.0"),
        ({"encoder_depth": 6}, "[train] encoder_depth must be an integer >= 3 and <= 5, got 6"),
        ({"decoder_channels": [16, 0]}, "[train] decoder_channels must be a non-empty list of integers >= 1, got [16, 0]"),
        ({"schedule": "linear"}, '[train] schedule must be one of constant, cosine, got "linear"'),
        ({"finetune": {"lr": "1e-5"}}, '[train.finetune] lr must be a number > 0, got "1e-5"'),
        ({"strategy": "baseline"}, "[train] has an unknown setting 'strategy'"),
    ],
)
def test_a_bad_train_table_names_the_key_and_the_file(table, message):
    # [train.finetune] is checked when the baseline trains too, so its typo shows before hours of training.
    with pytest.raises(PelmarkError) as info:
        resolve_config("baseline", table, {}, MANIFEST)
    assert str(info.value).startswith(f"{MANIFEST}: {message}")


def test_dataset_table():
    assert check(DatasetTable, {"name": " demo ", "landmarks": ["SPS"]}, "[dataset]") == {"name": "demo", "landmarks": ["SPS"]}
    with pytest.raises(PelmarkError, match=r"\[dataset\] name must be a non-empty string, got 3"):
        check(DatasetTable, {"name": 3, "landmarks": ["SPS"]}, "[dataset]", MANIFEST)
    assert describe(DatasetTable, "landmarks") == "a non-empty list of landmark names"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["phantom", "{tmp}/cohort", "--spacing", "0.1"], "error: --spacing must be a number of mm from 0.5 to 5, got 0.1"),
        (["phantom", "{tmp}/cohort", "--subjects", "0"], "error: --subjects must be an integer >= 1, got 0"),
        (["phantom", "{tmp}/cohort", "--novel-subjects", "-2"], "error: --novel-subjects must be an integer >= 0, got -2"),
        (["eval", "{tmp}/run", "--store", "{tmp}/s.zarr", "--out", "{tmp}/e", "--bootstrap", "0"], "error: --bootstrap must be an integer >= 1, got 0"),
        (["eval", "{tmp}/run", "--store", "{tmp}/s.zarr", "--out", "{tmp}/e", "--batch-size", "0"], "error: --batch-size must be an integer >= 1, got 0"),
        (["eval", "{tmp}/run", "--store", "{tmp}/s.zarr", "--out", "{tmp}/e", "--workers", "-1"], "error: --workers must be an integer >= 0, got -1"),
    ],
)  # fmt: skip
def test_phantom_and_eval_options_out_of_range_give_one_line_and_exit_1_before_any_work(tmp_path, args, message):
    """They were Typer ranges: a usage box and exit 2, unlike every other bad input."""
    from typer.testing import CliRunner

    from pelmark.cli import app

    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert result.output.strip() == message
    assert list(tmp_path.iterdir()) == []

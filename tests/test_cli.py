"""pelmark.cli: every command's help as a user reads it: -h, --version, flags, defaults, text kept verbatim."""

from __future__ import annotations

import dataclasses
import re
from importlib.metadata import version

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pelmark.cli import app
from pelmark.synth.settings import SynthSettings
from pelmark.train.config import STRATEGY_DEFAULTS, Strategy, TrainConfig

ROOT = get_command(app)


def _commands(command=ROOT, path=()):
    """(path, command) for the root, every group and every command under it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands())
LEAVES = {path: command for path, command in COMMANDS.items() if not hasattr(command, "commands")}


def _help(path: tuple[str, ...], flag: str = "--help") -> str:
    result = CliRunner().invoke(app, [*path, flag], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _squeezed(text: str) -> str:
    # Help is wrapped at spaces and hyphens: compare with all whitespace removed.
    return re.sub(r"\s+", "", text)


def _options(command):
    return [p for p in command.params if p.param_type_name == "option"]


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "pelmark")
def test_help_shows_every_help_text_verbatim(path):
    shown = _squeezed(_help(path))
    command = COMMANDS[path]
    texts = [command.help.split("\n\n")[0]] if command.help else []
    texts += [p.help for p in LEAVES.get(path, command).params if p.help]
    missing = [text for text in texts if _squeezed(text) not in shown]
    assert missing == []


def test_bracketed_table_names_survive_in_help():
    """Regression (issue 14): Rich read "[train]" as markup, so --config read "TOML file with a  table"."""
    shown = " ".join(_help(("train",)).split())
    assert "TOML file with a [train] table (a manifest works); [train.<strategy>] overrides it." in shown
    assert "smp encoder. [default: (resnet34)]" in shown
    assert "[synth] and [train] settings written into the manifest" in " ".join(_help(("phantom",)).split())
    assert "the manifest's [synth] value" in " ".join(_help(("synth",)).split())


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "pelmark")
def test_h_is_help_on_every_command(path):
    assert _help(path, "-h") == _help(path, "--help")


def test_version_is_the_installed_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"pelmark {version('pelmark')}\n"


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_boolean_options_are_flags_shown_without_a_value(path):
    shown = _help(path)
    assert "<bool>" not in shown
    for option in _options(LEAVES[path]):
        if option.type_descriptor.annotation is bool:
            assert option.is_flag, option.name  # --x or --x/--no-x: never --x VALUE
            names = " / ".join([", ".join(option.opts), *option.secondary_opts])
            assert re.search(rf"^\s+{re.escape(names)}\s", shown, re.MULTILINE), (names, shown)


def test_a_flag_refuses_a_value_and_its_negation_works(tmp_path):
    result = CliRunner().invoke(app, ["synth", "preview", str(tmp_path), "--out", str(tmp_path / "o"), "--per-split", "1", "true"])
    assert result.exit_code == 2 and "unexpected extra argument" in result.output
    result = CliRunner().invoke(app, ["convert-checkpoint", "a", "b", "--trust", "yes"])
    assert result.exit_code == 2 and "unexpected extra argument" in result.output


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_defaults_are_shown_one_way(path):
    # Every default is Typer's "[default: ...]" at the end of the line, never written into the help text.
    for param in LEAVES[path].params:
        assert not re.search(r"default|\[[^\]]*\]\.?$", param.help or "", re.IGNORECASE), (param.name, param.help)
    shown = _help(path)
    for option in _options(LEAVES[path]):
        if isinstance(option.show_default, str) or (option.default is not None and option.default is not False):
            assert re.search(rf"{re.escape(option.opts[0])}\b.*?\[default: [^\]]+\]", shown, re.DOTALL), option.name


def _shown_default(command, name: str) -> str:
    (option,) = [o for o in _options(command) if o.name == name]
    return option.show_default


def _same(shown: str, value) -> bool:
    if isinstance(value, bool):
        return shown in ("no-" * (not value) + name for name in ("augment", "compile", "flip-test"))
    if isinstance(value, (int, float)):
        return float(shown) == value
    return shown == getattr(value, "value", value)


def test_shown_defaults_are_the_settings_defaults():
    """The help states the defaults of SynthSettings and TrainConfig, which a manifest's table overrides."""
    checked = 0
    synth = COMMANDS[("synth", "run")]
    for field in dataclasses.fields(SynthSettings):
        name = "compile_renderer" if field.name == "compile" else field.name
        if field.default is not None and any(o.name == name for o in _options(synth)):
            assert _same(_shown_default(synth, name), field.default), field.name
            checked += 1
    train = COMMANDS[("train",)]
    finetune = STRATEGY_DEFAULTS[Strategy.FINETUNE]
    for field in dataclasses.fields(TrainConfig):
        if field.default is None or not any(o.name == field.name for o in _options(train)):
            continue
        general, *special = _shown_default(train, field.name).split("; ")
        assert _same(general, field.default), field.name
        differs = field.name in finetune and not _same(general, finetune[field.name])
        assert special == ([f"finetune {finetune[field.name]}"] if differs else []), field.name
        checked += 1
    assert checked >= 30


def test_synth_help_lists_the_render_options_and_the_subcommands():
    shown = _help(("synth",))
    assert shown.startswith("Usage: pelmark synth [OPTIONS] {manifest}\n   or: pelmark synth COMMAND [ARGS]...")
    for option in _options(COMMANDS[("synth", "run")]):
        assert re.search(rf"^\s+{re.escape(option.opts[0])}\b", shown, re.MULTILINE), option.name
    assert re.search(r"^Commands:\n\s+run\s.*\n\s+preview\s", shown, re.MULTILINE)


def test_synth_without_a_subcommand_runs_the_default_one(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "absent.toml"), "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {tmp_path / 'absent.toml'}")

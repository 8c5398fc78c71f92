"""Typed checks of every setting a user gives, in one place: the manifest's tables and the command-line options.

Each table or set of options has a strict pydantic model below. Strict means
that nothing is coerced: ``views = "10"`` or ``seed = "0"`` is refused rather
than read as a number, ``augment = "false"`` is refused rather than read as
true (``augment`` takes ``"none"``, ``"basic"`` or ``"realistic"``, or the booleans of
older files), and a whole number is never a boolean. A float setting accepts a TOML
integer (``lr = 1``). NaN and infinity are refused everywhere.

A refusal is one :class:`~pelmark.errors.PelmarkError` that names the key and
the file it came from, and says what the key must be::

    cohort/manifest.toml: [synth] views must be an integer >= 1, got 6.5
    --threads must be an integer >= 1, got -1

The models hold types and ranges; the stages' frozen dataclasses
(:class:`~pelmark.synth.settings.SynthSettings`,
:class:`~pelmark.train.config.TrainConfig`) hold the defaults and the checks
that involve several settings (``novel_views <= views``, ``sid < sdd``). A
test keeps each model's keys equal to its dataclass's fields.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pelmark.errors import PelmarkError
from pelmark.geometry import NOMINAL_VIEWS
from pelmark.registration import PoseLoss, Solver
from pelmark.synth.render import RendererKind
from pelmark.train.augment import Augment
from pelmark.train.config import Schedule, SoftArgmax
from pelmark.train.data import TargetKind
from pelmark.train.device_transforms import Transforms


def _choices(values) -> Any:
    """A Literal of the allowed spellings: an enum's values, or a tuple of strings."""
    return Literal[tuple(getattr(v, "value", v) for v in values)]  # Literal[("a", "b")] is Literal["a", "b"]


class _Strict(BaseModel):
    """No coercion and no unknown key. In the settings tables every key is optional: one left out takes the
    value of the layer below (the dataclass default, the manifest, ...)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


Count = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
Positive = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class SynthTable(_Strict):
    """``[synth]`` of a manifest and the options of ``pelmark synth`` (see :class:`~pelmark.synth.settings.SynthSettings`)."""

    views: Optional[Count] = None
    height: Optional[Annotated[int, Ge(8)]] = None
    width: Optional[Annotated[int, Ge(8)]] = None
    pixel_spacing: Optional[Positive] = None
    sdd: Optional[Positive] = None
    sid: Optional[Positive] = None
    rotation_range: Optional[Annotated[float, Ge(0), Le(180)]] = None
    translation_range: Optional[NonNegativeFloat] = None
    novel_views: Optional[NonNegative] = None
    view: Optional[_choices(NOMINAL_VIEWS)] = None
    seed: Optional[NonNegative] = None
    renderer: Optional[_choices(RendererKind)] = None
    n_points: Optional[Annotated[int, Ge(2)]] = None
    image_dtype: Optional[_choices(("float16", "float32"))] = None
    device: Optional[Name] = None
    # Checked here, before a store is created: a bad scheduler used to leave an empty store behind.
    scheduler: Optional[
        Annotated[str, StringConstraints(pattern=r"^(local|sync|(tcp|tls|ucx)://\S+)$")]
    ] = Field(None, description="local, sync, or a scheduler address such as tcp://HOST:PORT")
    workers: Optional[Count] = None
    threads: Optional[Count] = None
    batch_size: Optional[Count] = None
    compile: Optional[bool] = None


class TrainTable(_Strict):
    """``[train]`` and ``[train.<strategy>]`` of a TOML file and the options of ``pelmark train``
    (see :class:`~pelmark.train.config.TrainConfig`); the strategy is the command's argument."""

    epochs: Optional[Count] = None
    max_steps: Optional[Count] = None
    batch_size: Optional[Count] = None
    micro_batches: Optional[Count] = None
    lr: Optional[Positive] = None
    schedule: Optional[_choices(Schedule)] = None
    warmup_steps: Optional[NonNegative] = None
    size: Optional[Annotated[int, Ge(8)]] = None
    encoder: Optional[Name] = None
    encoder_depth: Optional[Annotated[int, Ge(3), Le(5)]] = None
    encoder_weights: Optional[Name] = None
    decoder_channels: Optional[Annotated[list[Count], MinLen(1)]] = None
    init: Optional[Name] = None
    target: Optional[_choices(TargetKind)] = None
    disk_radius_px: Optional[Positive] = None
    gaussian_sigma_px: Optional[Positive] = None
    augment: Optional[Union[bool, _choices(Augment)]] = Field(
        None, description="one of none, basic, realistic (in a TOML file also true = basic, false = none)"
    )
    pos_weight: Optional[Positive] = None
    pel_weight: Optional[NonNegativeFloat] = None
    bce_weight: Optional[NonNegativeFloat] = None
    softmax_weight: Optional[NonNegativeFloat] = None
    seg_weight: Optional[NonNegativeFloat] = None
    kl_weight: Optional[NonNegativeFloat] = None
    visibility_weight: Optional[NonNegativeFloat] = None
    visibility_warmup_steps: Optional[NonNegative] = None
    visibility_absent_weight: Optional[Positive] = None
    canvas_margin_px: Optional[NonNegative] = None
    soft_argmax: Optional[_choices(SoftArgmax)] = None
    soft_argmax_radius: Optional[Count] = None
    pose_loss: Optional[_choices(PoseLoss)] = None
    solver: Optional[_choices(Solver)] = None
    temperature: Optional[Positive] = None
    flip_test: Optional[bool] = None
    val_fraction: Optional[Annotated[float, Ge(0), Lt(1)]] = None
    bn_recalibration_images: Optional[NonNegative] = None
    seed: Optional[NonNegative] = None
    workers: Optional[NonNegative] = None
    device: Optional[Name] = None
    compile: Optional[bool] = None
    transforms: Optional[_choices(Transforms)] = None
    checkpoint_every: Optional[NonNegative] = None
    divergence_factor: Optional[Annotated[float, Gt(1)]] = None
    divergence_warmup: Optional[Count] = None


class DatasetTable(_Strict):
    """``[dataset]`` of a manifest."""

    name: Name = Field(description="a non-empty string")
    landmarks: Annotated[list[Name], MinLen(1)] = Field(description="a non-empty list of landmark names")
    description: Optional[str] = None
    classes: Optional[list[Name]] = Field(None, description="a list of bone class names (label k + 1 is classes[k])")


class PreviewOptions(_Strict):
    """The options of ``pelmark synth preview``."""

    per_split: Count


class PhantomOptions(_Strict):
    """The options of ``pelmark phantom``."""

    subjects: Count
    spacing: Annotated[float, Ge(0.5), Le(5.0)] = Field(description="a number of mm from 0.5 to 5")
    novel_subjects: Optional[NonNegative] = None


class EvalOptions(_Strict):
    """The numeric options of ``pelmark eval``."""

    samples: NonNegative
    batch_size: Count
    workers: NonNegative
    bootstrap: Count
    seed: NonNegative


# ---------------------------------------------------------------- checking


def check(
    model: type[_Strict], values: Mapping[str, Any], table: str | None = None, source: str | Path | None = None
) -> dict[str, Any]:
    """The given ``values`` checked against ``model``, as the model read them (an integer given for a float is a float).

    Args:
        model: one of the models above.
        values: a TOML table, or command-line options (None = not given, left out).
            Keys may be spelt with ``-`` or ``_``.
        table: the table's name in messages, e.g. ``"[synth]"``; None for command-line options,
            which are then named as options (``--threads``).
        source: the file the table came from, named in the message.

    Raises:
        PelmarkError: naming the first key that is unknown, of the wrong type or out of range.
    """
    given = {key.replace("-", "_"): (key, value) for key, value in values.items() if table is not None or value is not None}
    try:
        checked = model.model_validate({name: value for name, (_, value) in given.items()})
    except ValidationError as error:
        raise PelmarkError(_message(model, error.errors()[0], table, given), source) from None
    return {name: getattr(checked, name) for name in given}


def _message(model: type[_Strict], error: Mapping[str, Any], table: str | None, given: dict[str, tuple[str, Any]]) -> str:
    name = str(error["loc"][0])
    key = given[name][0] if name in given else name
    where = f"{table} {key}" if table is not None else f"--{key.replace('_', '-')}"
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted(model.model_fields))
        if table is None:
            return f"unknown option {where}"
        return f"{table} has an unknown setting '{key}' (known: {known})"
    if error["type"] == "missing":
        return f"{table or 'options'} needs '{key}' ({describe(model, name)})"
    return f"{where} must be {describe(model, name)}, got {_shown(given[name][1])}"


def _shown(value: Any) -> str:
    """A value as TOML spells it (true, "ten", 6.5), so the user recognises what they wrote."""
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


def describe(model: type[_Strict], name: str) -> str:
    """What ``model``'s field ``name`` accepts, in words: "an integer >= 1", "one of ap, pa"."""
    field = model.model_fields[name]
    if field.description:
        return field.description
    return _describe_type(field.rebuild_annotation(), plural=False)


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"), str: ("a string", "strings")}


def _describe_type(annotation: Any, plural: bool) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a, plural) for a in args if a is not type(None))
    if origin is Annotated:
        base, *metadata = args
        words = _describe_type(base, plural)
        if any(isinstance(m, MinLen) or getattr(m, "min_length", None) for m in metadata):
            words = ("non-empty " + words) if plural else ("a non-empty " + words.removeprefix("a "))
        bounds = [f"{symbol} {getattr(m, attr)}" for m in metadata for kind, attr, symbol in _BOUNDS if isinstance(m, kind)]
        return " ".join([words, " and ".join(bounds)]) if bounds else words
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return "a list of " + _describe_type(args[0], plural=True)
    return _TYPE_WORDS[annotation][plural]


_BOUNDS = ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<"))

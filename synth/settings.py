"""Synthesis settings: one frozen dataclass, resolved from defaults, the manifest and the command line."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pelmark.errors import PelmarkError
from pelmark.geometry import NOMINAL_VIEWS, Camera
from pelmark.synth.render import RendererKind, RenderSettings, Sampling


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    """Everything that decides what ``pelmark synth`` renders, and how it is run.

    ``view`` is the nominal view the random poses perturb: ``ap`` (the paper's)
    or ``pa`` (source under the table, as many real C-arms, DeepFluoro's among them).
    The paper's protocol is the default: 100 views per CT, rotations uniform in
    ±45° about each axis and translations in ±50 mm around the AP view, SDD
    1020 mm, a 768×768 detector of 0.388 mm pixels (about 30 cm), 20 novel
    views per training subject.
    """

    views: int = 100
    height: int = 768
    width: int | None = None
    pixel_spacing: float = 0.388
    sdd: float = 1020.0
    sid: float = 850.0
    rotation_range: float = 45.0
    translation_range: float = 50.0
    novel_views: int = 20
    view: str = "ap"
    seed: int = 0
    renderer: RendererKind = RendererKind.TRILINEAR
    n_points: int | None = None
    image_dtype: str = "float16"
    # How it runs: these do not change the data, so they are left out of the store's fingerprint.
    device: str = "auto"
    scheduler: str = "local"
    workers: int = 1
    threads: int | None = None
    batch_size: int = 8
    compile: bool = False

    RUNTIME_FIELDS = ("device", "scheduler", "workers", "threads", "batch_size", "compile")
    # Render settings that change speed or memory but not the images.
    RUNTIME_RENDER_FIELDS = ("chunk_samples", "compile")
    # Render settings added after stores existed that do not change a Siddon image: left out of a
    # Siddon store's fingerprint, so that such stores keep theirs.
    TRILINEAR_ONLY_RENDER_FIELDS = ("sampling", "antialias")
    # Render settings nanodrr does not read (it takes n_points, or one sample a voxel; see pelmark.synth.nanodrr_backend).
    NANODRR_UNUSED_RENDER_FIELDS = ("sampling", "step_voxels")

    def __post_init__(self):
        problems = []
        if self.views < 1:
            problems.append("views must be at least 1")
        if not 0 <= self.novel_views <= self.views:
            problems.append(f"novel_views must be between 0 and views ({self.views})")
        if self.height < 8 or (self.width is not None and self.width < 8):
            problems.append("the detector must be at least 8 pixels across")
        if self.pixel_spacing <= 0 or self.sdd <= 0 or not 0 < self.sid < self.sdd:
            problems.append("need pixel_spacing > 0 and 0 < sid < sdd")
        if self.rotation_range < 0 or self.translation_range < 0:
            problems.append("ranges must not be negative")
        if self.view not in NOMINAL_VIEWS:
            problems.append(f"view must be one of {', '.join(NOMINAL_VIEWS)}")
        if self.image_dtype not in ("float16", "float32"):
            problems.append("image_dtype must be float16 or float32")
        if self.workers < 1 or self.batch_size < 1:
            problems.append("workers and batch_size must be at least 1")
        if problems:
            raise PelmarkError("invalid synth settings: " + "; ".join(problems))

    @property
    def camera(self) -> Camera:
        return Camera.centered(
            self.height, self.width, sdd_mm=self.sdd, spacing_mm=self.pixel_spacing, sid_mm=self.sid
        )

    @property
    def render(self) -> RenderSettings:
        base = RenderSettings(renderer=RendererKind(self.renderer), compile=self.compile)
        if self.n_points is not None:
            base = dataclasses.replace(base, sampling=Sampling.UNIFORM, n_points=self.n_points)
        return base

    def data_fields(self) -> dict[str, Any]:
        """The settings that decide the data (and so the store's fingerprint)."""
        values = dataclasses.asdict(self)
        for name in self.RUNTIME_FIELDS:
            values.pop(name)
        if self.view == "ap":
            values.pop("view")  # the default: stores written before the setting existed keep their fingerprint
        values["renderer"] = RendererKind(self.renderer).value
        values["width"] = self.width if self.width is not None else self.height
        left_out = self.RUNTIME_RENDER_FIELDS
        if self.renderer == RendererKind.SIDDON:
            left_out += self.TRILINEAR_ONLY_RENDER_FIELDS
        elif self.renderer == RendererKind.NANODRR:
            left_out += self.NANODRR_UNUSED_RENDER_FIELDS
        values["render"] = {
            k: (v.value if hasattr(v, "value") else v)
            for k, v in dataclasses.asdict(self.render).items()
            if k not in left_out
        }
        return values


# Named [synth] tables a generated manifest can carry. "demo" keeps the paper's pose ranges and ~30 cm field
# of view on a 128² detector, with 50 views per CT (10 held out as novel views): the demo's 12 CTs give as
# many images as 6 x 100, but 8 training subjects and 4 novel subjects, so the subject-level (cluster)
# bootstrap of `pelmark eval` has several subjects to resample on either split.
SYNTH_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"views": 50, "height": 128, "pixel_spacing": 2.328, "novel_views": 10},
    "paper": {"views": 100, "height": 768, "pixel_spacing": 0.388, "novel_views": 20},
}


def resolve_settings(
    manifest_table: Mapping[str, Any], overrides: Mapping[str, Any], manifest_path: Path | None = None
) -> SynthSettings:
    """Defaults, then the manifest's ``[synth]`` table, then command-line options (None = not given).

    Each layer's types and ranges are checked by :mod:`pelmark.validation` first, so an error names the key
    and where it came from.
    """
    from pelmark.validation import SynthTable, check

    values = check(SynthTable, manifest_table, "[synth]", manifest_path)
    values.update(check(SynthTable, overrides))
    if "renderer" in values:
        values["renderer"] = RendererKind(values["renderer"])
    try:
        return SynthSettings(**values)
    except PelmarkError as error:  # a rule over several settings (novel_views <= views, sid < sdd)
        raise PelmarkError(error.message, error.path or manifest_path) from None

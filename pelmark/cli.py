"""The ``pelmark`` command line: one Typer app, one thin command per stage.

Each command parses and checks its options, then calls one typed function that
does the work. Heavy imports (torch, diffdrr) happen inside the commands so
``pelmark --help`` answers at once. A :class:`PelmarkError` becomes one line on
stderr and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from typer.core import TyperGroup

from pelmark.errors import PelmarkError

app = typer.Typer(
    name="pelmark",
    help="Pelvic landmark detection in fluoroscopy with a 2D/3D registration loss.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def reports_errors(command: Callable) -> Callable:
    """Turn a PelmarkError into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PelmarkError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _not_yet(stage: str) -> None:
    typer.echo(f"pelmark {stage}: not available in this version yet", err=True)
    raise typer.Exit(code=2)


@app.command()
@reports_errors
def phantom(
    out: Path = typer.Argument(..., help="Folder to write the cohort into (CTs, landmarks, manifest)."),
    subjects: int = typer.Option(6, "--subjects", min=1, help="Number of phantom subjects."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same files, bit for bit."),
    spacing: float = typer.Option(2.0, "--spacing", min=0.5, max=5.0, help="Voxel size in mm."),
    novel_subjects: Optional[int] = typer.Option(
        None, "--novel-subjects", min=0, help="How many subjects are held out as novel_subject (default: about 1 in 5)."
    ),
    beads: bool = typer.Option(False, "--beads", help="Also place small dense beads at the landmarks (geometry checks)."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Write a PNG of AP DRRs with landmarks."),
    synth_preset: str = typer.Option(
        "demo", "--synth-preset", help="[synth] settings written into the manifest: demo (CPU-sized), paper, or none."
    ),
) -> None:
    """Write a cohort of procedural pelvis CTs with exactly known landmarks."""
    from pelmark.synth.phantom.cohort import CohortSettings, write_cohort
    from pelmark.synth.settings import SYNTH_PRESETS

    if synth_preset != "none" and synth_preset not in SYNTH_PRESETS:
        raise PelmarkError(f"unknown --synth-preset '{synth_preset}' (demo, paper or none)")

    settings = CohortSettings(
        n_subjects=subjects,
        seed=seed,
        spacing_mm=spacing,
        n_novel_subjects=novel_subjects,
        beads=beads,
        preview=preview,
        synth=None if synth_preset == "none" else SYNTH_PRESETS[synth_preset],
    )
    manifest = write_cohort(out, settings)
    typer.echo(f"wrote {manifest}")


class _DefaultCommandGroup(TyperGroup):
    """A group whose first argument may be a subcommand or, failing that, the default command's argument."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


synth_app = typer.Typer(
    cls=_DefaultCommandGroup,
    no_args_is_help=True,
    help="Render the DRR dataset of a manifest into a Zarr store (`pelmark synth MANIFEST --out STORE`), "
    "or preview a store (`pelmark synth preview STORE --out DIR`).",
)
app.add_typer(synth_app, name="synth")


@synth_app.command("run")
@reports_errors
def synth_run(
    manifest: Path = typer.Argument(..., help="The cohort's TOML manifest."),
    out: Path = typer.Option(..., "--out", help="The Zarr store to write (resumed if it exists)."),
    views: Optional[int] = typer.Option(None, help="Views per CT [100]."),
    height: Optional[int] = typer.Option(None, help="Detector rows [768]."),
    width: Optional[int] = typer.Option(None, help="Detector columns [= height]."),
    pixel_spacing: Optional[float] = typer.Option(None, help="Detector pixel size in mm [0.388]."),
    sdd: Optional[float] = typer.Option(None, help="Source-to-detector distance in mm [1020]."),
    sid: Optional[float] = typer.Option(None, help="Source-to-isocentre distance in mm [850]."),
    rotation_range: Optional[float] = typer.Option(None, help="Rotation about each axis, uniform in ±deg [45]."),
    translation_range: Optional[float] = typer.Option(None, help="Translation along each axis, uniform in ±mm [50]."),
    novel_views: Optional[int] = typer.Option(None, help="Views of each train CT held out as novel_view [20]."),
    seed: Optional[int] = typer.Option(None, help="Root seed of the poses and splits [0]."),
    renderer: Optional[str] = typer.Option(None, help="trilinear (fast) or siddon (exact reference)."),
    n_points: Optional[int] = typer.Option(None, help="Samples per ray for the trilinear renderer."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [auto]."),
    scheduler: Optional[str] = typer.Option(None, help="local (a LocalCluster when --workers > 1), sync, or tcp://HOST:PORT."),
    workers: Optional[int] = typer.Option(None, help="Worker processes of the local cluster [1]."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per worker."),
    compile_renderer: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the renderer: ~1.4x faster on CPU, needs a C++ compiler."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made from other inputs or settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Render the manifest's DRRs into a chunked Zarr store; a rerun finishes only what is missing."""
    from pelmark.synth.pipeline import run_synth

    overrides = dict(
        views=views, height=height, width=width, pixel_spacing=pixel_spacing, sdd=sdd, sid=sid,
        rotation_range=rotation_range, translation_range=translation_range, novel_views=novel_views,
        seed=seed, renderer=renderer, n_points=n_points, device=device, scheduler=scheduler,
        workers=workers, threads=threads, compile=compile_renderer,
    )
    report = run_synth(manifest, out, overrides, overwrite=overwrite, progress=progress)
    typer.echo(
        f"{report.store}: {report.n_images} images; rendered {len(report.rendered_subjects)} subjects, "
        f"{len(report.skipped_subjects)} already done"
    )


@synth_app.command("preview")
@reports_errors
def synth_preview(
    store: Path = typer.Argument(..., help="A store written by pelmark synth."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG montages."),
    per_split: int = typer.Option(12, help="Images per split."),
) -> None:
    """PNG montages of DRRs with their landmarks, one per split."""
    from pelmark.synth.preview import write_previews

    for path in write_previews(store, out, per_split=per_split):
        typer.echo(f"wrote {path}")


@app.command()
@reports_errors
def train() -> None:
    """Train a landmark heatmap model from a synth store."""
    _not_yet("train")


@app.command("eval")
@reports_errors
def eval_() -> None:
    """Evaluate trained runs on a store: Table-1 CSVs and figures."""
    _not_yet("eval")


def main() -> None:
    app(prog_name="pelmark")


if __name__ == "__main__":
    sys.exit(main())

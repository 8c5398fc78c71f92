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
) -> None:
    """Write a cohort of procedural pelvis CTs with exactly known landmarks."""
    from pelmark.synth.phantom.cohort import CohortSettings, write_cohort

    settings = CohortSettings(
        n_subjects=subjects,
        seed=seed,
        spacing_mm=spacing,
        n_novel_subjects=novel_subjects,
        beads=beads,
        preview=preview,
    )
    manifest = write_cohort(out, settings)
    typer.echo(f"wrote {manifest}")


@app.command()
@reports_errors
def synth() -> None:
    """Render the DRR dataset of a manifest into a Zarr store."""
    _not_yet("synth")


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

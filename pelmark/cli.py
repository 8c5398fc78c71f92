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
    # Plain help text: Rich markup would swallow the TOML table names in it ("[train]", "[synth]").
    rich_markup_mode=None,
    # Inherited by every command and group below.
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"pelmark {version('pelmark')}")
        except PackageNotFoundError:
            typer.echo("pelmark (not installed: no version)")
        raise typer.Exit()


@app.callback()
def root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Show pelmark's version and exit."
    ),
) -> None:
    pass


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


@app.command()
@reports_errors
def phantom(
    out: Path = typer.Argument(..., help="Folder to write the cohort into (CTs, landmarks, manifest)."),
    subjects: int = typer.Option(6, "--subjects", help="Number of phantom subjects."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same files, bit for bit."),
    spacing: float = typer.Option(2.0, "--spacing", help="Voxel size in mm, 0.5 to 5."),
    novel_subjects: Optional[int] = typer.Option(
        None, "--novel-subjects", show_default="about 1 in 5", help="How many subjects are held out as novel_subject."
    ),
    beads: bool = typer.Option(False, "--beads", help="Also place small dense beads at the landmarks (geometry checks)."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Write a PNG of AP DRRs with landmarks."),
    synth_preset: str = typer.Option(
        "demo", "--synth-preset", help="[synth] and [train] settings written into the manifest: demo (CPU-sized), paper, or none."
    ),
) -> None:
    """Write a cohort of procedural pelvis CTs with exactly known landmarks."""
    from pelmark.synth.phantom.cohort import CohortSettings, write_cohort
    from pelmark.synth.settings import SYNTH_PRESETS
    from pelmark.train.presets import TRAIN_PRESETS
    from pelmark.validation import PhantomOptions, check

    check(PhantomOptions, {"subjects": subjects, "spacing": spacing, "novel_subjects": novel_subjects})

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
        train=None if synth_preset == "none" else TRAIN_PRESETS[synth_preset],
    )
    manifest = write_cohort(out, settings)
    typer.echo(f"wrote {manifest}")


class _DefaultCommandGroup(TyperGroup):
    """A group whose first argument may be a subcommand or, failing that, the default command's argument.

    Its help shows the default command's usage, arguments and options, then the subcommands,
    since ``pelmark synth MANIFEST`` is how the group is mostly used.
    """

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        default = self.commands[self.default_command]
        formatter.write_usage(ctx.command_path, " ".join(default.collect_usage_pieces(ctx)))
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

    def format_options(self, ctx, formatter):
        self.commands[self.default_command].format_options(ctx, formatter)
        self.format_commands(ctx, formatter)


synth_app = typer.Typer(
    cls=_DefaultCommandGroup,
    no_args_is_help=True,
    help="Render the DRR dataset of a manifest into a Zarr store (`pelmark synth MANIFEST --out STORE`), "
    "or preview a store (`pelmark synth preview STORE --out DIR`).\n\n"
    "Render options left out take the manifest's [synth] value, else the default shown.",
)
app.add_typer(synth_app, name="synth")


@synth_app.command("run")
@reports_errors
def synth_run(
    manifest: Path = typer.Argument(..., help="The cohort's TOML manifest."),
    out: Path = typer.Option(..., "--out", help="The Zarr store to write (resumed if it exists)."),
    views: Optional[int] = typer.Option(None, show_default="100", help="Views per CT."),
    height: Optional[int] = typer.Option(None, show_default="768", help="Detector rows."),
    width: Optional[int] = typer.Option(None, show_default="the height", help="Detector columns."),
    pixel_spacing: Optional[float] = typer.Option(None, show_default="0.388", help="Detector pixel size in mm."),
    sdd: Optional[float] = typer.Option(None, show_default="1020", help="Source-to-detector distance in mm."),
    sid: Optional[float] = typer.Option(None, show_default="850", help="Source-to-isocentre distance in mm."),
    rotation_range: Optional[float] = typer.Option(None, show_default="45", help="Rotation about each axis, uniform in ±deg."),
    translation_range: Optional[float] = typer.Option(None, show_default="50", help="Translation along each axis, uniform in ±mm."),
    novel_views: Optional[int] = typer.Option(None, show_default="20", help="Views of each train CT held out as novel_view."),
    seed: Optional[int] = typer.Option(None, show_default="0", help="Root seed of the poses and splits."),
    renderer: Optional[str] = typer.Option(None, show_default="trilinear", help="trilinear (fast), siddon (exact reference) or nanodrr (fused GPU kernel; pip install 'pelmark[gpu]')."),
    n_points: Optional[int] = typer.Option(
        None, show_default="one sample per CT slice", help="Uniform samples per ray (the previous trilinear sampling)."
    ),
    device: Optional[str] = typer.Option(None, show_default="auto", help="auto, cpu or cuda."),
    scheduler: Optional[str] = typer.Option(
        None, show_default="local", help="local (a LocalCluster when --workers > 1), sync, or tcp://HOST:PORT."
    ),
    workers: Optional[int] = typer.Option(None, show_default="1", help="Worker processes of the local cluster."),
    threads: Optional[int] = typer.Option(None, show_default="CPU cores / workers", help="Torch threads per worker."),
    compile_renderer: Optional[bool] = typer.Option(
        None,
        "--compile/--no-compile",
        show_default="no-compile",
        help="torch.compile the renderer: ~1.4x faster on CPU, needs a C++ compiler.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made from other inputs or settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Render the manifest's DRRs into a chunked Zarr store; a rerun finishes only what is missing.

    Render options left out take the manifest's [synth] value, else the default shown.
    """
    from pelmark.synth.pipeline import run_synth

    overrides = dict(
        views=views, height=height, width=width, pixel_spacing=pixel_spacing, sdd=sdd, sid=sid,
        rotation_range=rotation_range, translation_range=translation_range, novel_views=novel_views,
        seed=seed, renderer=renderer, n_points=n_points, device=device, scheduler=scheduler,
        workers=workers, threads=threads, compile=compile_renderer,
    )
    report = run_synth(manifest, out, overrides, overwrite=overwrite, progress=progress)
    rate = f" ({report.rendered_images} DRRs in {report.seconds:.1f} s, {report.drr_per_s:.2f} DRR/s)" if report.rendered_images else ""
    typer.echo(
        f"{report.store}: {report.n_images} images; rendered {len(report.rendered_subjects)} subjects{rate}, "
        f"{len(report.skipped_subjects)} already done"
    )
    for warning in report.warnings:
        typer.echo(f"warning: {report.store}: {warning}", err=True)


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
def train(
    strategy: str = typer.Argument(..., help="baseline, composite, pel-only, finetune or seg-informed."),
    store: Path = typer.Argument(..., help="The Zarr store written by pelmark synth."),
    out: Path = typer.Option(..., "--out", help="The run folder (checkpoints, metrics, run.json)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML file with a [train] table (a manifest works); [train.<strategy>] overrides it."
    ),
    epochs: Optional[int] = typer.Option(None, show_default="28; finetune 1", help="Passes over the training images."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, show_default="8", help="Images per step, over all processes."),
    micro_batches: Optional[int] = typer.Option(None, show_default="1", help="Split each step into this many accumulated pieces."),
    lr: Optional[float] = typer.Option(None, show_default="1e-4", help="Adam learning rate."),
    size: Optional[int] = typer.Option(None, show_default="512", help="Side of the square model input."),
    encoder: Optional[str] = typer.Option(None, show_default="resnet34", help="smp encoder."),
    encoder_depth: Optional[int] = typer.Option(None, show_default="5", help="Encoder stages, 3-5."),
    encoder_weights: Optional[Path] = typer.Option(None, help="Local file with encoder weights (nothing is downloaded)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this run folder or checkpoint (finetune needs it)."),
    pos_weight: Optional[float] = typer.Option(None, show_default="1", help="BCE weight of mask pixels (1: the paper's plain BCE)."),
    pel_weight: Optional[float] = typer.Option(None, show_default="1", help="λ, the weight of PEL."),
    bce_weight: Optional[float] = typer.Option(
        None,
        show_default="baseline, composite 1; pel-only, finetune 0",
        help="Weight of the BCE heatmap loss; 1 on finetune = BCE + λ·PEL.",
    ),
    softmax_weight: Optional[float] = typer.Option(
        None, show_default="0", help="Weight of the spatial-softmax cross-entropy added to BCE (0: the paper's BCE alone)."
    ),
    pose_loss: Optional[str] = typer.Option(
        None, show_default="paper; finetune reprojection", help="PEL's pose loss: paper (eq. 10), geodesic, mtre or reprojection."
    ),
    soft_argmax: Optional[str] = typer.Option(
        None,
        show_default="global",
        help="Points PEL registers: global (paper eqs. 1-2) or local (a window around the argmax).",
    ),
    soft_argmax_radius: Optional[int] = typer.Option(None, show_default="3", help="Window radius of --soft-argmax local, model px."),
    warmup_steps: Optional[int] = typer.Option(None, show_default="0", help="Steps of linear learning-rate warm-up."),
    schedule: Optional[str] = typer.Option(None, show_default="constant", help="Learning-rate schedule: constant or cosine."),
    solver: Optional[str] = typer.Option(None, show_default="lm", help="Registration inside PEL: lm, adam or lbfgs."),
    temperature: Optional[float] = typer.Option(None, show_default="1", help="Soft-argmax temperature on the logits."),
    flip_test: Optional[bool] = typer.Option(
        None,
        "--flip-test/--no-flip-test",
        show_default="no-flip-test",
        help="Train on the flip test's logits (image and mirror image averaged), as pelmark eval scores them; twice the compute.",
    ),
    augment: Optional[str] = typer.Option(
        None,
        show_default="none",
        help="none; basic (random crop, scale, gamma, contrast, noise); or realistic (the crop and a simulated C-arm: "
        "bone ratio, dose noise, scatter, blur, collimator, log, inversion, 180° turn).",
    ),
    val_fraction: Optional[float] = typer.Option(None, show_default="0.1", help="Share of the train split held out for validation."),
    seed: Optional[int] = typer.Option(None, show_default="42", help="Seed of weights, order and augmentation."),
    workers: Optional[int] = typer.Option(None, show_default="2", help="DataLoader worker processes."),
    device: Optional[str] = typer.Option(None, show_default="auto", help="auto, cpu, cuda or cuda:N."),
    compile_model: Optional[bool] = typer.Option(
        None,
        "--compile/--no-compile",
        show_default="no-compile",
        help="torch.compile the model: faster steps on a GPU after a slower start; needs a C++ compiler on CPU.",
    ),
    transforms: Optional[str] = typer.Option(
        None,
        show_default="auto",
        help="Where crop, resize, normalisation and basic augmentation run: worker (each DataLoader process, per image), "
        "device (the trainer, per batch; the workers only read) or auto (device on CUDA, worker on a CPU and for --augment realistic).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    auto_resume: bool = typer.Option(
        False, "--auto-resume", help="Start, or resume an unfinished run in --out; a finished run is left as it is."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    allow_incomplete: bool = typer.Option(
        False, "--allow-incomplete", help="Train on a store whose synth was interrupted (its finished subjects only)."
    ),
) -> None:
    """Train a landmark heatmap model from a synth store with one of the paper's four strategies, or seg-informed.

    Settings left out take --config's [train.<strategy>] value, then its [train] value, else the default shown.
    """
    from pelmark.train.config import read_train_table, resolve_config
    from pelmark.train.loop import existing_run_state
    from pelmark.train.loop import train as run_training

    table = read_train_table(config) if config is not None else {}
    overrides = dict(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, micro_batches=micro_batches, lr=lr, size=size, encoder=encoder,
        encoder_depth=encoder_depth, encoder_weights=None if encoder_weights is None else str(encoder_weights),
        init=None if init is None else str(init), pos_weight=pos_weight, pel_weight=pel_weight, bce_weight=bce_weight, softmax_weight=softmax_weight,
        pose_loss=pose_loss, soft_argmax=soft_argmax, soft_argmax_radius=soft_argmax_radius, warmup_steps=warmup_steps,
        schedule=schedule, solver=solver, temperature=temperature, flip_test=flip_test, augment=augment, val_fraction=val_fraction, seed=seed, workers=workers, device=device,
        compile=compile_model, transforms=transforms,
    )
    resolved = resolve_config(strategy, table, overrides, config)
    _warn_incomplete(store, allow_incomplete)
    if auto_resume and not overwrite:
        found = existing_run_state(out)
        if found in ("COMPLETE", "DIV"):
            typer.echo(f"{out}: already {found}; left as it is (--overwrite trains it again)")
            return
        resume = resume or found is not None
        # A run killed before its first checkpoint has nothing to resume: start it again.
        overwrite = found is None and (out / "run.json").is_file()
    report = run_training(
        resolved, store, out, resume=resume, overwrite=overwrite, progress=progress, allow_incomplete=allow_incomplete
    )
    best = "n/a" if report.best_val_rmse_px == float("inf") else f"{report.best_val_rmse_px:.2f} px"
    if report.status.value == "DIV":
        typer.echo(f"{out}: DIV after {report.steps} steps ({report.reason}); recorded in run.json")
    else:
        typer.echo(f"{out}: {report.status.value} after {report.steps} steps; best validation RMSE {best}")


def _warn_incomplete(store: Path, allow_incomplete: bool) -> None:
    """Refuse a store whose synth was interrupted, or with --allow-incomplete say what it lacks, one line each."""
    from pelmark.store import check_complete

    for missing in check_complete(store, allow_incomplete):
        typer.echo(f"warning: {store}: {missing}", err=True)


@app.command("eval")
@reports_errors
def eval_(
    runs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", help="Run folders written by pelmark train; table rows follow this order."
    ),
    store: Path = typer.Option(..., "--store", help="The Zarr store to evaluate on."),
    out: Path = typer.Option(..., "--out", help="Results folder (tables, per-image CSVs, figures, summary.json)."),
    split: Optional[list[str]] = typer.Option(
        None,
        "--split",
        show_default="the novel splits present",
        help="Split to evaluate, repeatable: novel_view, novel_subject or train.",
    ),
    samples: int = typer.Option(4, "--samples", help="Images per split in the sample figures."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best (falls back to last) or last."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out folder that already holds files."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    refine: bool = typer.Option(
        False, "--refine/--no-refine", help="Add <run>+reg rows: all CT landmarks projected under the robust pose of the found ones."
    ),
    flip_test: Optional[bool] = typer.Option(
        None,
        "--flip-test/--no-flip-test",
        show_default="on where the landmarks have -l/-r pairs",
        help="Average each model's logits over the image and its mirror image (left and right swapped); --no-flip-test is the paper's single pass.",
    ),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples (over subjects) of the 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    allow_incomplete: bool = typer.Option(
        False, "--allow-incomplete", help="Evaluate on a store whose synth was interrupted (its finished subjects only)."
    ),
) -> None:
    """Evaluate trained runs on a store: Table 1 (RMSE per landmark) in px and mm with 95% intervals, pose errors, figures."""
    from pelmark.evaluate.runner import EvalSettings, evaluate_runs, parse_splits
    from pelmark.evaluate.stat_tables import format_comparison, mean_intervals
    from pelmark.evaluate.tables import format_table
    from pelmark.validation import EvalOptions, check

    check(EvalOptions, {"samples": samples, "batch_size": batch_size, "workers": workers, "bootstrap": bootstrap, "seed": seed})
    settings = EvalSettings(
        splits=parse_splits(split), samples=samples, batch_size=batch_size, workers=workers, device=device,
        checkpoint=checkpoint, overwrite=overwrite, progress=progress, refine=refine, flip_test=flip_test, bootstrap=bootstrap,
        seed=seed, allow_incomplete=allow_incomplete,
    )
    _warn_incomplete(store, allow_incomplete)
    report = evaluate_runs(runs, store, out, settings)
    typer.echo(format_table(report.table1, len(report.landmark_names), mean_intervals(report.intervals)))
    if report.comparison:
        typer.echo(
            f"\nMean RMSE against {report.comparison[0]['baseline']}, and of each +reg row against its own run"
            " (paired bootstrap, 95% CI, two-sided p):"
        )
        typer.echo(format_comparison(report.comparison))
    if report.visibility:
        from pelmark.evaluate.visibility import visibility_text

        typer.echo("\nLandmark visibility: accuracy of 'present' (%) with its 95 % CI, precision and recall (%), RMSE (model px) over landmarks truly and predictedly present, Dice per bone class:")
        typer.echo(visibility_text(list(report.visibility), report.classes))
    for note in report.notes:
        typer.echo(f"note: {note}")
    names = ", ".join(f"L{i + 1}={name}" for i, name in enumerate(report.landmark_names))
    typer.echo(f"RMSE in model px; {names}\nwrote {len(report.files)} files to {report.out}")


@app.command("import-deepfluoro")
@reports_errors
def import_deepfluoro_cmd(
    h5_file: Path = typer.Argument(..., help="DeepFluoro's full-resolution HDF5 file (ipcai_2020_full_res_data.h5)."),
    out: Path = typer.Option(..., "--out", help="Folder to create: CTs, landmarks, manifest.toml, xrays.zarr."),
    landmarks: str = typer.Option("paper", "--landmarks", help="paper (the 8 of the paper) or deepfluoro14."),
    holdout: Optional[str] = typer.Option(
        None, "--holdout", help="Specimen held out as novel_subject (leave-one-specimen-out), e.g. 17-1882."
    ),
    size: int = typer.Option(768, "--size", help="Side of the square store images (768 halves the 1536² detector)."),
    tolerance_px: float = typer.Option(
        0.5, "--tolerance-px", help="Largest conversion error allowed (file pixels) before the import fails."
    ),
    pixels: str = typer.Option("intensity", "--pixels", help="intensity (DeepFluoro's raw X-rays) or line-integral."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier import in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Import DeepFluoro: CTs and landmarks as a manifest, real X-rays as a store in the synth schema."""
    from pelmark.deepfluoro.convert import LandmarkSet
    from pelmark.deepfluoro.importer import ImportSettings, PixelKind, import_deepfluoro

    try:
        landmark_set = LandmarkSet(landmarks)
    except ValueError:
        raise PelmarkError(f"unknown --landmarks '{landmarks}' (paper or deepfluoro14)") from None
    try:
        pixel_kind = PixelKind(pixels)
    except ValueError:
        raise PelmarkError(f"unknown --pixels '{pixels}' (intensity or line-integral)") from None
    settings = ImportSettings(
        landmarks=landmark_set,
        holdout=holdout,
        size=size,
        tolerance_px=tolerance_px,
        pixels=pixel_kind,
        overwrite=overwrite,
    )
    summary = import_deepfluoro(h5_file, out, settings, progress=progress)
    for line in summary.lines():
        typer.echo(line)


@app.command("convert-checkpoint")
@reports_errors
def convert_checkpoint_cmd(
    old: Path = typer.Argument(..., help="A checkpoint of an earlier pelmark (e.g. RUN_DIR/checkpoints/best.pt)."),
    new: Path = typer.Argument(..., help="Where to write the converted checkpoint (a new file)."),
    trust: bool = typer.Option(False, "--trust", help="Required: OLD is unpickled in full, which runs any code it holds."),
) -> None:
    """Re-save an earlier pelmark checkpoint as tensors and plain values, which pelmark loads safely."""
    from pelmark.train.checkpoint import convert_checkpoint

    if not trust:
        raise PelmarkError("converting unpickles the file in full, which runs any code it holds; pass --trust if you made it", old)
    typer.echo(f"wrote {convert_checkpoint(old, new)}")


@app.command()
@reports_errors
def predict(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by pelmark train (with --onnx: the first X-ray file)."),
    images: Optional[list[Path]] = typer.Argument(None, metavar="IMAGE", help="X-ray files: DICOM, PNG, TIFF or 2D NIfTI."),
    out: Path = typer.Option(..., "--out", help="Folder for <image>.csv, <image>.json and <image>.png per image."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Run this ONNX file (from pelmark export) instead of a run folder."),
    pixel_spacing: Optional[float] = typer.Option(
        None, "--pixel-spacing", show_default="the file's: DICOM ImagerPixelSpacing, else PixelSpacing; NIfTI header", help="Detector pixel size in mm."
    ),
    sdd: Optional[float] = typer.Option(
        None, "--sdd", show_default="the file's DistanceSourceToDetector, else the training store's", help="Source-to-detector distance in mm."
    ),
    pixels: Optional[str] = typer.Option(
        None, "--pixels", show_default="the file's: DICOM PixelIntensityRelationship LIN = intensity; else line-integral",
        help="intensity (raw detector values: log-transformed) or line-integral (bone bright).",
    ),
    invert: bool = typer.Option(False, "--invert", help="Flip bone dark/bright from what the file implies."),
    rot180: bool = typer.Option(False, "--rot180", help="Turn each image 180 degrees before the model (C-arms that store it upside down)."),
    ct_landmarks: Optional[Path] = typer.Option(
        None, "--ct-landmarks", help="The CT's 3D landmarks (.mrk.json): register the detections to them and reproject them."
    ),
    ct: Optional[Path] = typer.Option(None, "--ct", help="The CT of --ct-landmarks: the pose's origin is its centre, as in a store."),
    store: Optional[Path] = typer.Option(None, "--store", help="The training store, for a run whose run.json does not record its detector."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (a run folder; ONNX runs on the CPU)."),
    flip_test: Optional[bool] = typer.Option(
        None,
        "--flip-test/--no-flip-test",
        show_default="on where the landmarks have -l/-r pairs",
        help="Average the logits over the image and its mirror image (left and right swapped), as pelmark eval does.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out folder of earlier predictions."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Detect landmarks on X-ray files; optionally register them to the CT's landmarks.

    A bad file gets one error line and the others go on; the exit code is 1 if any failed.
    """
    from pelmark.deepfluoro.importer import PixelKind
    from pelmark.infer.backends import OnnxModel, TorchModel
    from pelmark.infer.outputs import check_out, start_out
    from pelmark.infer.predict import predict_files, read_ct_landmarks
    from pelmark.infer.preprocess import ReadSettings

    run_dir, images = (None, [run, *(images or [])]) if onnx is not None else (run, list(images or []))
    if not images:
        raise PelmarkError("no X-ray files given (pelmark predict RUN IMAGE... --out DIR, or --onnx FILE IMAGE...)")
    if ct is not None and ct_landmarks is None:
        raise PelmarkError("--ct is only used with --ct-landmarks", ct)
    try:
        pixel_kind = None if pixels is None else PixelKind(pixels)
    except ValueError:
        raise PelmarkError(f"unknown --pixels '{pixels}' (intensity or line-integral)") from None
    settings = ReadSettings(pixel_spacing_mm=pixel_spacing, sdd_mm=sdd, pixels=pixel_kind, invert=invert, rot180=rot180)
    named = [("an input image", p) for p in images] + [(what, p) for what, p in (("the run", run_dir), ("the ONNX file", onnx)) if p is not None]
    check_out(out, named, overwrite)
    from pelmark.train.model import choose_flip_order

    model = OnnxModel(onnx) if onnx is not None else TorchModel(run_dir, device=device, store=store)
    try:
        flip, why = choose_flip_order(model.grid.landmark_names, model.grid.segmentation_classes, asked=flip_test)
    except PelmarkError as error:
        raise PelmarkError(error.message, onnx or run_dir) from None
    ct_points = None if ct_landmarks is None else read_ct_landmarks(ct_landmarks, model.grid.landmark_names, ct)
    start_out(out)
    if why:
        typer.echo(f"note: {why}")
    report = predict_files(images, model, out, settings, ct_points, progress=progress, flip=flip)
    typer.echo(f"predicted {len(report.written)} of {len(images)} images with {model.name}{' (flip test)' if flip else ''}; wrote {out}")
    if report.failures:
        typer.echo(f"failed ({len(report.failures)}):", err=True)
        for path, message in report.failures:
            typer.echo(f"  {path}: {message}", err=True)
        raise typer.Exit(code=1)


@app.command()
@reports_errors
def export(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by pelmark train."),
    onnx: Path = typer.Option(..., "--onnx", help="The ONNX file to write (.onnx)."),
    store: Optional[Path] = typer.Option(None, "--store", help="The training store, for a run whose run.json does not record its detector."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing ONNX file."),
) -> None:
    """Export a run's heatmap model to ONNX (dynamic batch and size, preprocessing in its metadata) and check it against PyTorch."""
    from pelmark.infer.export import export_onnx

    report = export_onnx(run, onnx, store=store, overwrite=overwrite)
    typer.echo(report.line())
    typer.echo(f"wrote {report.path}")


def main() -> None:
    app(prog_name="pelmark")


if __name__ == "__main__":
    sys.exit(main())

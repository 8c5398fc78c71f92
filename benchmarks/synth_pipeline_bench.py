"""End-to-end ``pelmark synth`` speed: DRRs per second including CT loading, input checks and Zarr writes (a benchmark, not a test).

Writes a phantom cohort of ``--subjects`` CTs (not timed), then runs the synth
pipeline into a fresh store in one process (``scheduler = "sync"``) and reports
the rendering stage's rate (:attr:`~pelmark.synth.pipeline.SynthReport.drr_per_s`:
CT loading, rendering and writes) and the whole run's (input checks and store
creation included). Compare with ``synth_bench.py``, the renderer's own rate.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth_pipeline_bench.py
    .venv/bin/python benchmarks/synth_pipeline_bench.py --subjects 4 --views 100 --size 768 --spacing 1.0 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pelmark.synth.phantom.cohort import CohortSettings, write_cohort
from pelmark.synth.pipeline import run_synth
from pelmark.synth.settings import SynthSettings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=2, help="phantom CTs")
    parser.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size, mm")
    parser.add_argument("--views", type=int, default=8, help="DRRs per CT")
    parser.add_argument("--size", type=int, default=256, help="detector rows and columns (the same field of view)")
    parser.add_argument("--batch-size", type=int, default=None, help="poses per render call (default: synth's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    synth = SynthSettings()
    overrides = {
        "views": args.views,
        "novel_views": 0,
        "height": args.size,
        "pixel_spacing": synth.pixel_spacing * synth.height / args.size,
        "device": args.device,
        "scheduler": "sync",
    }
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        cohort = CohortSettings(n_subjects=args.subjects, seed=0, spacing_mm=args.spacing, n_novel_subjects=0, preview=False)
        manifest = write_cohort(Path(tmp) / "cohort", cohort)
        load_before = os.getloadavg()[0]
        tic = time.perf_counter()
        report = run_synth(manifest, Path(tmp) / "synth.zarr", overrides, progress=True)
        total_s = time.perf_counter() - tic
        load = (load_before + os.getloadavg()[0]) / 2

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu"))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "subjects": args.subjects,
        "views": args.views,
        "size": args.size,
        "drr": report.rendered_images,
        "render_stage_s": round(report.seconds, 3),
        "drr_per_s": round(report.drr_per_s, 3),
        "total_s": round(total_s, 3),
        "drr_per_s_total": round(report.rendered_images / total_s, 3),
        "load_average": round(load, 2),
    }
    print(
        f"{report.rendered_images} DRRs of {args.size}² on {result['device']}: {report.drr_per_s:.2f} DRR/s in the "
        f"rendering stage, {result['drr_per_s_total']:.2f} DRR/s for the whole run ({total_s:.1f} s); load average {load:.2f}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Training speed and memory: the model's step, the data pipeline alone, and PEL's share (a benchmark, not a test).

Measures in one run, on the same machine and store:

1. model: images per second of full training steps (forward, BCE, backward,
   Adam) of the U-Net at ``--size``, on batches already in memory;
2. data: images per second of the data pipeline as the trainer streams it
   (``--workers`` processes). With ``--transforms worker``: the DataLoader
   alone, Zarr chunk read, crop and resize to ``--size``, normalisation,
   ``--augment`` and, on CPU, heatmap targets (on CUDA the trainer draws the
   targets on the device, inside the step of 1.). With ``--transforms device``
   (``auto`` on CUDA): the workers read the chunks and draw the parameters,
   and the loop copies each batch to the device and makes its model inputs
   there (pelmark.train.device_transforms); the workers alone and the device
   transforms alone are printed too, and the step of 1. includes the device
   transforms. ``data_over_model`` must be at least 3: the data pipeline is
   then never the bottleneck;
3. PEL: the time of a composite step (BCE + PEL: soft-argmax, LM registration,
   implicit backward) against a baseline step; ``pel_share`` is the extra
   time over the composite step's time;
4. peak memory: the process's resident set (CPU) or CUDA's peak allocation.

Without ``--store`` it writes a phantom subject and renders ``--views`` DRRs at
the paper's 768² detector into a temporary store first (not timed).

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_bench.py
    .venv/bin/python benchmarks/train_bench.py --device cuda --batch-size 32 --workers 12 --augment basic --transforms worker
    .venv/bin/python benchmarks/train_bench.py --store outputs/synth.zarr --size 128 --encoder resnet18 --encoder-depth 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pelmark.devices import resolve_device
from pelmark.errors import PelmarkError
from pelmark.train.config import TrainConfig
from pelmark.train.data import StoreDataset
from pelmark.train.device_transforms import model_inputs
from pelmark.train.loop import Distributed, Trainer


def make_store(root: Path, views: int) -> Path:
    """One phantom subject at 3 mm, ``views`` DRRs of 768² (the paper's detector)."""
    from pelmark.synth.phantom.cohort import CohortSettings, write_cohort
    from pelmark.synth.pipeline import run_synth

    manifest = write_cohort(root / "cohort", CohortSettings(n_subjects=1, seed=0, spacing_mm=3.0, n_novel_subjects=0, preview=False))
    store = root / "bench.zarr"
    run_synth(manifest, store, {"views": views, "novel_views": 0, "height": 768, "scheduler": "sync"}, progress=True)
    return store


def timed_steps(trainer: Trainer, batch: dict, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_rates(trainer: Trainer, dataset: StoreDataset, args, device: torch.device) -> tuple[float, float, float | None]:
    """(pipeline, workers alone, device transforms alone) in images per second; the last is None for worker transforms.

    Every image of the store once per pass, after a warm-up batch. Under device transforms the
    pipeline is the workers' batches copied to the device and made into model inputs there.
    """
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, drop_last=False,
        pin_memory=device.type == "cuda",
    )

    def rate(make_inputs: bool) -> float:
        images, start, end = 0, None, None
        for i, batch in enumerate(loader):
            if make_inputs:
                trainer._inputs(batch, dataset.settings)
            if i == 0:
                _synchronize(device)
                start = time.perf_counter()
                continue
            images += len(batch["index"])
            if i == len(loader) - 1:  # before the workers are shut down
                _synchronize(device)
                end = time.perf_counter()
        return images / (end - start) if images else float("nan")

    workers = rate(make_inputs=False)
    if not trainer.transforms_on_device:
        return workers, workers, None
    pipeline = rate(make_inputs=True)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(iter(loader)).items()}
    times = []
    for _ in range(args.steps + 1):  # the first is a warm-up
        _synchronize(device)
        start = time.perf_counter()
        model_inputs(batch, dataset.settings)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return pipeline, workers, len(batch["index"]) / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a synth store (default: render a small 768² one)")
    parser.add_argument("--views", type=int, default=24, help="DRRs of the rendered store")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--encoder-depth", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as pelmark train --compile")
    parser.add_argument("--transforms", default="auto", choices=("auto", "worker", "device"), help="as pelmark train --transforms")
    parser.add_argument("--augment", default="none", choices=("none", "basic", "realistic"), help="as pelmark train --augment")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:  # bad settings (e.g. --transforms device --augment realistic) before a store is rendered
        config = TrainConfig.from_dict(dict(
            strategy="composite", size=args.size, encoder=args.encoder, encoder_depth=args.encoder_depth,
            batch_size=args.batch_size, workers=args.workers, device=args.device, val_fraction=0.0,
            divergence_factor=1e30, compile=args.compile, transforms=args.transforms, augment=args.augment,
        ))
        device = resolve_device(args.device)
    except PelmarkError as error:
        parser.error(str(error))

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(Path(tmp), args.views)
        trainer = Trainer(config, store, Path(tmp) / "run", Distributed(0, 1, device), progress=False)

        # The data pipeline alone, on the training images with the trainer's settings (augmentation included).
        dataset = StoreDataset(store, dataclasses.replace(trainer.train_set.settings, seed=0))
        data_ips, workers_ips, device_ips = data_rates(trainer, dataset, args, device)

        batch = next(iter(DataLoader(dataset, batch_size=args.batch_size, shuffle=False)))
        # The same model and batch, stepped as the baseline (BCE) and as the composite (BCE + PEL).
        trainer.config = TrainConfig.from_dict({**config.to_dict(), "strategy": "baseline"})
        baseline_times = timed_steps(trainer, batch, args.steps, device)
        trainer.config = config
        composite_times = timed_steps(trainer, batch, args.steps, device)

    t_base = statistics.median(baseline_times)
    t_comp = statistics.median(composite_times)
    model_ips = args.batch_size / t_base
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": args.size,
        "encoder": f"{args.encoder}/depth{args.encoder_depth}",
        "batch_size": args.batch_size,
        "workers": args.workers,
        "compile": args.compile,
        "transforms": trainer.transforms.value,
        "augment": args.augment,
        "model_images_per_s": round(model_ips, 3),
        "data_images_per_s": round(data_ips, 3),
        "workers_images_per_s": round(workers_ips, 3),
        "device_transforms_images_per_s": None if device_ips is None else round(device_ips, 3),
        "data_over_model": round(data_ips / model_ips, 2),
        "baseline_step_s": round(t_base, 4),
        "composite_step_s": round(t_comp, 4),
        "pel_share": round(max(t_comp - t_base, 0.0) / t_comp, 4),
        "peak_memory_gb": round(peak_gb, 3),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
    }
    print(f"device: {result['device']}; transforms {trainer.transforms.value}, augment {args.augment}")
    inside = " (device transforms and targets included)" if device_ips is not None else ""
    print(f"model: {model_ips:.2f} images/s (baseline step {t_base:.3f} s for {args.batch_size} images{inside})")
    print(f"data:  {data_ips:.2f} images/s with {args.workers} workers ({result['data_over_model']}x the model; target >= 3)")
    if device_ips is not None:
        print(f"       workers alone {workers_ips:.2f} images/s (read and draw); device transforms alone {device_ips:.2f} images/s")
    print(f"PEL:   composite step {t_comp:.3f} s, PEL share {100 * result['pel_share']:.1f} %")
    print(f"peak memory: {peak_gb:.2f} GB ({result['peak_memory_kind']})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

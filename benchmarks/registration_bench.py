"""Forward + backward time and accuracy of the registration solvers (a benchmark, not a test).

Compares the converged Levenberg-Marquardt layer (closed-form start, implicit
backward) with the paper's unrolled optimisers: Adam (100 iterations, lr 1e-3,
from the identity) and L-BFGS (from the identity, at most 100 iterations with
a backtracking line search, history 10). Each timed call is ``register`` plus
``pel_paper(pose, pose_true).backward()`` on float32 landmarks, as in training.

Times are the minimum over ``--repeats`` runs of each solver after one warm-up:
on a shared machine the minimum is the least disturbed estimate of the cost. Process CPU time is reported beside wall-clock time; the
two agree on one thread, while with more threads the CPU time also counts the
threads' waiting. On a loaded machine prefer ``--threads 1``: for tensors this
small intra-op threads only add synchronisation, and a parallel region can wait
milliseconds for a busy core.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/registration_bench.py --batch 32 --landmarks 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from pelmark.geometry import Camera, project, sample_poses
from pelmark.registration import RegistrationSettings, Solver, pel_paper, pose_errors, register


@dataclasses.dataclass(frozen=True)
class Case:
    """One synthetic batch: true poses, 3D landmarks and noisy 2D detections."""

    camera: Camera
    pose_true: torch.Tensor
    points_world_mm: torch.Tensor
    landmarks_px: torch.Tensor
    weights: torch.Tensor


def make_case(batch: int, landmarks: int, noise_px: float, seed: int, device: torch.device = torch.device("cpu")) -> Case:
    """Points spread like a pelvis (±120 mm x, ±60 mm y, ±80 mm z), poses as in the paper (±45°, ±50 mm).

    The same numbers on every device: drawn on the CPU, then moved.
    """
    rng = np.random.default_rng(seed)
    camera = Camera.centered(768, sdd_mm=1020.0, spacing_mm=0.388, sid_mm=850.0)
    half = np.array([120.0, 60.0, 80.0])
    points = torch.from_numpy(rng.uniform(-half, half, size=(batch, landmarks, 3)))
    pose_true = torch.from_numpy(sample_poses(batch, 45.0, 50.0, rng))
    clean = project(points, pose_true, camera)
    noisy = clean + noise_px * torch.from_numpy(rng.standard_normal(clean.shape))
    return Case(
        camera=camera,
        pose_true=pose_true.to(device),
        points_world_mm=points.float().to(device),
        landmarks_px=noisy.float().to(device),
        weights=torch.ones(batch, landmarks, device=device),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(case: Case, solver: Solver, settings: RegistrationSettings) -> tuple[float, float, dict[str, float]]:
    """One forward + backward: wall-clock ms, process CPU ms, and the accuracy reached."""
    landmarks = case.landmarks_px.clone().requires_grad_(True)
    synchronize(landmarks.device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = register(landmarks, case.weights, case.points_world_mm, case.camera, solver=solver, settings=settings)
    pel_paper(result.pose, case.pose_true.float()).backward()
    synchronize(landmarks.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rotation_deg, translation_mm = pose_errors(result.pose.detach().double(), case.pose_true)
    accuracy = {
        "rotation_deg": float(rotation_deg.mean()),
        "translation_mm": float(translation_mm.mean()),
        "residual_px": float(result.residual_px.mean()),
        "converged": float(result.converged.float().mean()),
        "iterations": float(result.iterations.float().mean()),
        "grad_finite": float(torch.isfinite(landmarks.grad).all()),
    }
    return wall * 1e3, cpu * 1e3, accuracy


def time_solver(case: Case, solver: Solver, repeats: int, settings: RegistrationSettings) -> dict[str, float]:
    """Min and median wall time, min CPU time (ms) and the accuracy of one solver."""
    walls, cpus = [], []
    for run in range(repeats + 1):
        wall, cpu, accuracy = run_once(case, solver, settings)
        if run > 0:  # the first run warms up caches and the allocator
            walls.append(wall)
            cpus.append(cpu)
    return {"ms": min(walls), "median_ms": statistics.median(walls), "cpu_ms": min(cpus), **accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--landmarks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--noise-px", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (auto: CUDA if present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}")

    case = make_case(args.batch, args.landmarks, args.noise_px, args.seed, device)
    settings = RegistrationSettings()
    stats = {solver.value: time_solver(case, solver, args.repeats, settings) for solver in Solver}
    for name, s in stats.items():
        print(
            f"{name:6s} {s['ms']:9.2f} ms (median {s['median_ms']:.2f}, cpu {s['cpu_ms']:.2f})  "
            f"rotation {s['rotation_deg']:.3f} deg  "
            f"translation {s['translation_mm']:.3f} mm  residual {s['residual_px']:.3f} px  "
            f"converged {s['converged']:.0%}  iterations {s['iterations']:.1f}"
        )
    speedup = stats["adam"]["ms"] / stats["lm"]["ms"]
    print(f"lm is {speedup:.0f}x faster than the paper's adam (forward + backward, batch {args.batch})")
    summary: dict[str, object] = {
        "lm_ms": round(stats["lm"]["ms"], 3),
        "adam_ms": round(stats["adam"]["ms"], 3),
        "lbfgs_ms": round(stats["lbfgs"]["ms"], 3),
        "speedup_vs_adam": round(speedup, 1),
        "speedup_vs_lbfgs": round(stats["lbfgs"]["ms"] / stats["lm"]["ms"], 1),
        "lm_cpu_ms": round(stats["lm"]["cpu_ms"], 3),
        "adam_cpu_ms": round(stats["adam"]["cpu_ms"], 3),
        "lbfgs_cpu_ms": round(stats["lbfgs"]["cpu_ms"], 3),
        "speedup_vs_adam_cpu": round(stats["adam"]["cpu_ms"] / stats["lm"]["cpu_ms"], 1),
    }
    for name, s in stats.items():
        for key in ("rotation_deg", "translation_mm", "residual_px", "converged", "iterations", "grad_finite"):
            summary[f"{name}_{key}"] = round(s[key], 4)
    summary.update(
        device=device_name,
        threads=torch.get_num_threads(),
        batch=args.batch,
        landmarks=args.landmarks,
        noise_px=args.noise_px,
        repeats=args.repeats,
        timing="min over repeats, forward + backward",
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Forward + backward time and accuracy of the registration solvers (a benchmark, not a test).

Compares the converged Levenberg-Marquardt layer (closed-form start, implicit
backward) with the paper's unrolled optimisers: Adam (100 iterations, lr 1e-3,
from the identity) and L-BFGS (from the identity, at most 100 iterations with
a backtracking line search, history 10). Each timed call is ``register`` plus
``pel_paper(pose, pose_true).backward()`` on float32 landmarks, as in training.
It also times ``register_robust`` (RANSAC over 4-landmark subsets, then LM on
the inliers, as ``pelmark eval --refine``) on the same batch with one 40 px
outlier per sample.

Each of ``--repeats`` rounds runs every solver in turn, a warm-up call then
``--inner`` timed calls back to back; a solver's time is the minimum over
them. On a shared machine the minimum is the least disturbed estimate of the
cost, and the turns make every solver meet the same moments of the machine's
load (run one solver after the other, a burst of load on the host can fall on
one of them only). The speed-up over Adam is given both as the ratio of the
minima and as the median of the rounds' own ratios. Process CPU time is reported beside wall-clock time; the
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
from pelmark.registration import RegistrationSettings, Solver, pel_paper, pose_errors, register, register_robust


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


def time_solvers(case: Case, repeats: int, inner: int, settings: RegistrationSettings) -> dict[str, dict[str, float]]:
    """Min and median wall time, min CPU time (ms) and the accuracy of each solver, run in turns.

    Each of ``repeats`` rounds runs every solver in turn: one warm-up call, then ``inner``
    timed calls back to back, of which the round keeps the fastest. All solvers thus meet
    the same moments of a shared machine's load, each timed warm (right after another
    solver, a 3 ms call runs slower on cold caches). ``paired_speedup`` is the median
    over rounds of Adam's time over LM's in the same round.
    """
    walls: dict[str, list[float]] = {solver.value: [] for solver in Solver}
    cpus: dict[str, list[float]] = {solver.value: [] for solver in Solver}
    accuracy: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for solver in Solver:
            run_once(case, solver, settings)  # warm-up
            calls = [run_once(case, solver, settings) for _ in range(inner)]
            wall, cpu, accuracy[solver.value] = min(calls, key=lambda call: call[0])
            walls[solver.value].append(wall)
            cpus[solver.value].append(cpu)
    stats = {
        name: {
            "ms": min(walls[name]),
            "median_ms": statistics.median(walls[name]),
            "cpu_ms": min(cpus[name]),
            **accuracy[name],
        }
        for name in walls
    }
    stats["lm"]["paired_speedup"] = statistics.median(a / b for a, b in zip(walls["adam"], walls["lm"]))
    return stats


def time_robust(case: Case, repeats: int, outlier_px: float = 40.0) -> dict[str, float]:
    """``register_robust`` (RANSAC over 4-landmark subsets, LM on the inliers, as ``pelmark eval --refine``)
    with the first landmark of every sample moved ``outlier_px`` off: min and median ms, and how often
    that outlier was rejected."""
    landmarks = case.landmarks_px.double().clone()
    landmarks[:, 0, 0] += outlier_px
    args = (landmarks, case.weights.double(), case.points_world_mm.double(), case.camera)
    register_robust(*args)  # warm-up
    walls = []
    for _ in range(repeats):
        synchronize(landmarks.device)
        start = time.perf_counter()
        robust = register_robust(*args)
        synchronize(landmarks.device)
        walls.append((time.perf_counter() - start) * 1e3)
    rejected = float((~robust.inliers[:, 0]).float().mean())
    return {"robust_ms": min(walls), "robust_median_ms": statistics.median(walls), "robust_outlier_rejected": rejected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--landmarks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the solvers in turn")
    parser.add_argument("--inner", type=int, default=3, help="timed calls of each solver per round, after a warm-up")
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
    stats = time_solvers(case, args.repeats, args.inner, settings)
    for name, s in stats.items():
        print(
            f"{name:6s} {s['ms']:9.2f} ms (median {s['median_ms']:.2f}, cpu {s['cpu_ms']:.2f})  "
            f"rotation {s['rotation_deg']:.3f} deg  "
            f"translation {s['translation_mm']:.3f} mm  residual {s['residual_px']:.3f} px  "
            f"converged {s['converged']:.0%}  iterations {s['iterations']:.1f}"
        )
    speedup = stats["adam"]["ms"] / stats["lm"]["ms"]
    robust = time_robust(case, args.repeats)
    print(
        f"robust {robust['robust_ms']:9.2f} ms (median {robust['robust_median_ms']:.2f})  RANSAC + LM, one "
        f"40 px outlier per sample, rejected in {robust['robust_outlier_rejected']:.0%}"
    )
    paired = stats["lm"]["paired_speedup"]
    print(
        f"lm is {speedup:.0f}x faster than the paper's adam (forward + backward, batch {args.batch}; "
        f"ratio of the minima; median of the rounds' ratios {paired:.0f}x)"
    )
    summary: dict[str, object] = {
        "lm_ms": round(stats["lm"]["ms"], 3),
        "adam_ms": round(stats["adam"]["ms"], 3),
        "lbfgs_ms": round(stats["lbfgs"]["ms"], 3),
        "speedup_vs_adam": round(speedup, 1),
        "paired_speedup_vs_adam": round(paired, 1),
        "speedup_vs_lbfgs": round(stats["lbfgs"]["ms"] / stats["lm"]["ms"], 1),
        "lm_cpu_ms": round(stats["lm"]["cpu_ms"], 3),
        "adam_cpu_ms": round(stats["adam"]["cpu_ms"], 3),
        "lbfgs_cpu_ms": round(stats["lbfgs"]["cpu_ms"], 3),
        "speedup_vs_adam_cpu": round(stats["adam"]["cpu_ms"] / stats["lm"]["cpu_ms"], 1),
    }
    summary.update({key: round(value, 4) for key, value in robust.items()})
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
        inner=args.inner,
        timing="min over rounds of the solvers in turn, forward + backward",
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Smooth curves through control points, sampled at even arc length."""

from __future__ import annotations

import numpy as np


def arc_length(curve: np.ndarray) -> np.ndarray:
    """Cumulative arc length (M,) along a polyline (M, 3), starting at 0."""
    steps = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    return np.concatenate([[0.0], np.cumsum(steps)])


def resample(curve: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced in arc length along a polyline, ends included."""
    s = arc_length(curve)
    target = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(target, s, curve[:, a]) for a in range(curve.shape[1])], axis=1)


def catmull_rom(control: np.ndarray, spacing_mm: float) -> np.ndarray:
    """A Catmull-Rom spline through the control points (n, 3), sampled every ``spacing_mm``.

    The end tangents mirror the neighbouring segment, so the curve starts and
    ends exactly at the first and last control points.
    """
    control = np.asarray(control, dtype=np.float64)
    padded = np.concatenate([2 * control[:1] - control[1:2], control, 2 * control[-1:] - control[-2:-1]])
    u = np.linspace(0.0, 1.0, 64, endpoint=False)[:, None]
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1 : i + 3]
        pieces.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * u
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2
                + (3 * p1 - p0 - 3 * p2 + p3) * u**3
            )
        )
    dense = np.concatenate(pieces + [control[-1:]])
    n = max(int(np.ceil(arc_length(dense)[-1] / spacing_mm)) + 1, 2)
    return resample(dense, n)


def tangents(curve: np.ndarray) -> np.ndarray:
    """Unit tangents (M, 3) of a sampled curve."""
    t = np.gradient(curve, axis=0)
    return t / np.linalg.norm(t, axis=1, keepdims=True)

"""What ``pelmark predict`` writes per image into ``--out``: ``<name>.csv``, ``<name>.json`` and ``<name>.png``.

``<name>`` is the input file's name without its suffix (``-2``, ``-3``, ... when two inputs share
one). Coordinates are the input file's pixels: ``x`` the column, ``y`` the row, the centre of
pixel (row r, column c) at (c, r), as everywhere in pelmark.

CSV, one row per landmark
    ``image, landmark, x_px, y_px, peak_probability, present``; for a segmentation-informed model
    also ``visibility``, its v̂ (0 not found, 0.5 found off its bone, 1 on it; present needs 1); with ``--ct-landmarks`` also
    ``reprojected_x_px, reprojected_y_px, inlier, registration_degenerate, registration_unconfirmed,
    present_registered`` and the pose ``rx_rad, ry_rad, rz_rad, tx_mm, ty_mm, tz_mm`` (the same on
    every row of an image). ``present_registered`` is ``pelmark eval --refine``'s visibility: the
    reprojected CT landmark lies on the image (``present`` where the registration is degenerate or
    unconfirmed); on the demo cohort it was right more often than the heatmap's ``present``.
JSON
    The same rows under ``landmarks``, the pose under ``registration``, and the file's
    geometry: its camera (``camera``), what was read from the header, what was missing
    (``missing_tags``) and where each value came from (``sources``).
PNG
    The image as the model sees it (line integral, bone bright) at the file's resolution and
    orientation, present landmarks as red crosses, absent ones as grey crosses, and the
    reprojected CT landmarks as green circles.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pelmark.errors import PelmarkError
from pelmark.infer.predict import ImagePrediction
from pelmark.io.atomic import write_text_atomic
from pelmark.registration.robust import MIN_INLIERS

MARKER = ".pelmark-predict"
POSE_COLUMNS = ("rx_rad", "ry_rad", "rz_rad", "tx_mm", "ty_mm", "tz_mm")


def check_out(out: Path, inputs: Sequence[tuple[str, Path]], overwrite: bool) -> None:
    """Refuse an ``--out`` that is an input, or a folder of other files; with ``overwrite``, one of predict's own.

    Raises:
        PelmarkError: naming ``out``.
    """
    from pelmark.io.outputs import is_empty_folder, refuse_inputs

    out = Path(out)
    refuse_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise PelmarkError("--out is a file; choose a folder", out)
    if out.is_dir() and not is_empty_folder(out):
        if not (out / MARKER).is_file():
            raise PelmarkError("--out holds files that pelmark predict did not write; choose an empty or new folder", out)
        if not overwrite:
            raise PelmarkError("--out holds earlier predictions; pass --overwrite to replace them", out)


def start_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by pelmark predict\n")


def file_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per input: its stem, with ``-2``, ``-3``, ... for repeats."""
    stems, used = [], set()
    for path in paths:
        stem, base, n = file_stem(path), file_stem(path), 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem.lower())
        stems.append(stem)
    return stems


def landmark_rows(prediction: ImagePrediction) -> list[dict[str, Any]]:
    """One dict per landmark: the CSV's columns (see the module docstring)."""
    rows = []
    registration = prediction.registration
    if registration is not None:
        inside = prediction.prepared.file_camera.contains(torch.from_numpy(np.asarray(registration.reprojected_px))).numpy()
    for i, name in enumerate(prediction.landmark_names):
        row: dict[str, Any] = {
            "image": str(prediction.xray.path),
            "landmark": name,
            "x_px": float(prediction.points_px[i, 0]),
            "y_px": float(prediction.points_px[i, 1]),
            "peak_probability": float(prediction.peak_probability[i]),
            "present": bool(prediction.present[i]),
        }
        if prediction.visibility is not None:
            row["visibility"] = float(prediction.visibility[i])
        if registration is not None:
            row["reprojected_x_px"] = float(registration.reprojected_px[i, 0])
            row["reprojected_y_px"] = float(registration.reprojected_px[i, 1])
            row["inlier"] = bool(registration.inliers[i])
            row["registration_degenerate"] = registration.degenerate
            row["registration_unconfirmed"] = registration.unconfirmed
            row["present_registered"] = bool(inside[i]) if registration.trusted else bool(prediction.present[i])
            row.update({column: float(v) for column, v in zip(POSE_COLUMNS, registration.pose)})
        rows.append(row)
    return rows


def prediction_json(prediction: ImagePrediction, model_name: str) -> dict[str, Any]:
    xray, prepared = prediction.xray, prediction.prepared
    document: dict[str, Any] = {
        "image": str(xray.path),
        "format": xray.format.value,
        "height": xray.height,
        "width": xray.width,
        "model": model_name,
        "flip_test": prediction.flip_test,
        "camera": prepared.file_camera.to_dict(),
        "rot180": prepared.rot180,
        "model_input": {"camera": prepared.model_camera.to_dict(), "height": int(prepared.image.shape[1]), "width": int(prepared.image.shape[2])},
        "missing_tags": list(xray.missing_tags),
        "header_notes": list(xray.notes),
        "sources": prepared.sources,
        "pixel_convention": "x = column, y = row of the input file; the centre of pixel (row r, column c) is (x=c, y=r)",
        "present_rule": "heatmap peak sigmoid >= 0.5 and argmax on the image (pelmark eval's found rule)",
        "landmarks": landmark_rows(prediction),
    }
    registration = prediction.registration
    if registration is not None:
        document["registration"] = {
            "method": "pelmark.registration.register_robust (RANSAC over subsets of the present landmarks, then lm on the inliers)",
            "pose": {"rotvec_rad": registration.pose[:3].tolist(), "translation_mm": registration.pose[3:].tolist()},
            "pose_convention": "p' = R(r) p + t on the CT landmarks, in front of the nominal AP C-arm (pelmark.geometry)",
            "degenerate": registration.degenerate,
            "inliers": int(registration.inliers.sum()),
            "unconfirmed": registration.unconfirmed,
            "unconfirmed_rule": f"fewer than {MIN_INLIERS} inliers: no landmark beyond the minimal subset agrees with the pose",
        }
    return document


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_prediction(prediction: ImagePrediction, out: Path, stem: str, model_name: str) -> tuple[Path, ...]:
    """Write ``<stem>.csv``, ``<stem>.json`` and ``<stem>.png`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = out / f"{stem}.csv", out / f"{stem}.json", out / f"{stem}.png"
    write_text_atomic(csv_path, _csv_text(landmark_rows(prediction)))
    write_text_atomic(json_path, json.dumps(prediction_json(prediction, model_name), indent=2) + "\n")
    write_overlay(png_path, prediction)
    return csv_path, json_path, png_path


def write_overlay(path: Path, prediction: ImagePrediction) -> None:
    """The overlay PNG (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = prediction.prepared.line_integral
    height, width = image.shape
    figure_width = 6.0
    fig = plt.figure(figsize=(figure_width, figure_width * height / width), dpi=max(100, round(width / figure_width)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, cmap="gray", interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    points, present = prediction.points_px, prediction.present
    ax.scatter(points[present, 0], points[present, 1], marker="+", s=80, c="red", linewidths=1.5)
    ax.scatter(points[~present, 0], points[~present, 1], marker="x", s=40, c="0.6", linewidths=1.0)
    for name, (x, y), found in zip(prediction.landmark_names, points, present):
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="red" if found else "0.6")
    registration = prediction.registration
    if registration is not None and registration.trusted:
        reprojected = registration.reprojected_px
        ax.scatter(reprojected[:, 0], reprojected[:, 1], marker="o", s=60, facecolors="none", edgecolors="lime", linewidths=1.2)
    fig.savefig(path)
    plt.close(fig)

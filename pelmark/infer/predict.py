"""Landmarks on X-ray files: one image at a time, a registration to CT landmarks if asked, a batch that survives bad files.

Per image: read (:mod:`pelmark.infer.images`), prepare (:mod:`pelmark.infer.preprocess`),
the model's logits, each landmark's argmax (:func:`pelmark.train.model.hard_argmax`) and
the sigmoid of its peak, as ``pelmark eval`` predicts. A landmark is *present* by
``pelmark eval``'s found rule (:data:`pelmark.evaluate.predict.FOUND_PROBABILITY`): its peak
probability reaches 0.5 and its argmax lies on the file's image (not in the padding). A
segmentation-informed model also gives seed 003's visibility v̂ of each landmark
(:func:`pelmark.train.seg_informed.discrete_visibility`), and a landmark it finds off its own bone
(v̂ = 0.5) is not present: the landmarks that vote in ``pelmark eval --refine``, and the level that
``pelmark eval``'s validation images chose on every demo run (README, *Results*, round 6).

With CT landmarks, the present landmarks are registered to them (a model with a canvas margin
adds those it finds in the margin, outside its input, which are not present but still say where
the landmark projects: the votes of :meth:`pelmark.evaluate.predict.Predictions.votes`) by
:func:`pelmark.registration.register_robust` (RANSAC over subsets, then LM on the inliers),
as ``pelmark eval --refine`` does, in the camera of the file's image (turned by
``--rot180``), and every CT landmark is projected under that pose
(:func:`pelmark.geometry.project`). The pose moves the CT landmarks as
:mod:`pelmark.geometry` says; its world origin is the centre of ``--ct`` when given (the
store's convention), else the origin of the landmark file.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pelmark.errors import PelmarkError
from pelmark.infer.backends import HeatmapModel
from pelmark.infer.images import XrayImage, read_xray
from pelmark.infer.preprocess import Prepared, ReadSettings, prepare

# At least this many landmarks pin a pose (register_robust's subsets are of 4).
MIN_REGISTRATION_LANDMARKS = 4


@dataclasses.dataclass(frozen=True, eq=False)
class CTLandmarks:
    """The CT's 3D landmarks in the order of the model's channels.

    Attributes:
        path: the landmark file.
        points_world_mm: (L, 3) RAS mm, origin at the CT's centre (``ct``) or the file's origin.
        ct: the CT whose centre is the world origin, if given.
    """

    path: Path
    points_world_mm: np.ndarray
    ct: Path | None = None


def read_ct_landmarks(path: Path, names: Sequence[str], ct: Path | None = None) -> CTLandmarks:
    """The landmarks ``names`` of a Slicer ``.mrk.json`` (or ``.fcsv``, CSV), shifted to the CT's centre when ``ct`` is given.

    Raises:
        PelmarkError: a missing file or landmark, or too few landmarks to register.
    """
    from pelmark.io.landmarks import load_landmarks

    if len(names) < MIN_REGISTRATION_LANDMARKS:
        raise PelmarkError(f"registration needs at least {MIN_REGISTRATION_LANDMARKS} landmarks; the model has {len(names)}", path)
    points = load_landmarks(path, names)
    if ct is not None:
        from pelmark.io.ct import load_ct

        points = load_ct(ct).ras_to_world(points)
    return CTLandmarks(Path(path), points, None if ct is None else Path(ct))


@dataclasses.dataclass(frozen=True, eq=False)
class Registration:
    """The robust registration of one image's present landmarks.

    Attributes:
        pose: (6,) θ = (r rad, t mm) in pelmark's convention.
        degenerate: the registration could not be trusted (too few or collinear present landmarks, ...).
        inliers: (L,) present landmarks the final fit used.
        unconfirmed: not degenerate, but fewer than :data:`~pelmark.registration.robust.MIN_INLIERS` inliers
            (none beyond the minimal subset): the pose is not to be trusted.
        reprojected_px: (L, 2) every CT landmark projected under ``pose``, in the file's pixels.
    """

    pose: np.ndarray
    degenerate: bool
    inliers: np.ndarray
    unconfirmed: bool
    reprojected_px: np.ndarray

    @property
    def trusted(self) -> bool:
        """Neither degenerate nor unconfirmed: the pose and its reprojections can be used."""
        return not (self.degenerate or self.unconfirmed)


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePrediction:
    """The landmarks of one X-ray file.

    Attributes:
        xray: the file as read.
        prepared: its model input and cameras.
        landmark_names: the model's landmarks.
        points_px: (L, 2) argmax of each heatmap in the file's pixels (x = column, y = row).
        model_px: (L, 2) the same in model-input pixels.
        peak_probability: (L,) sigmoid of each heatmap's largest logit.
        present: (L,) the found rule (see the module docstring).
        registration: with CT landmarks, their registration; None otherwise.
        flip_test: the logits are the flip test's (image and mirror image averaged).
        visibility: (L,) a segmentation-informed model's v̂ in {0, 0.5, 1}; None for a heatmap model.
    """

    xray: XrayImage
    prepared: Prepared
    landmark_names: tuple[str, ...]
    points_px: np.ndarray
    model_px: np.ndarray
    peak_probability: np.ndarray
    present: np.ndarray
    registration: Registration | None = None
    flip_test: bool = False
    visibility: np.ndarray | None = None


def predict_image(
    path: Path, model: HeatmapModel, settings: ReadSettings, ct: CTLandmarks | None = None, flip: tuple[int, ...] | None = None
) -> ImagePrediction:
    """Read, prepare, run and (with ``ct``) register one X-ray file.

    With ``flip`` (the landmark channels' mirror order), the logits are the flip test's
    (:func:`pelmark.train.model.flip_test`), as ``pelmark eval`` predicts by default.

    Raises:
        PelmarkError: a bad file (see :func:`read_xray` and :func:`prepare`) or a model of another output size.
    """
    from pelmark.evaluate.predict import FOUND_PROBABILITY
    from pelmark.landmark_sets import landmark_bone_matrix
    from pelmark.train.model import flip_test, output_channels
    from pelmark.train.seg_informed import canvas_margin, discrete_visibility, image_argmax, split_outputs

    xray = read_xray(path)
    prepared = prepare(xray, model.grid, settings)
    image = prepared.image[None]
    outputs = model.outputs(image).float() if flip is None else flip_test(lambda x: model.outputs(x).float(), image, flip)
    names, classes = model.grid.landmark_names, model.grid.segmentation_classes
    try:
        margin = canvas_margin(outputs, prepared.image.shape)
    except ValueError:
        margin = -1
    if outputs.shape[0] != 1 or outputs.shape[1] != output_channels(len(names), classes) or margin < 0 or (margin and not classes):
        raise PelmarkError(f"model gave outputs of shape {tuple(outputs.shape)} for an input of {tuple(prepared.image.shape)}", path)
    logits, seg_logits = split_outputs(outputs, len(names), margin)
    model_px = image_argmax(logits, margin)[0].to(torch.float64)
    peak = torch.sigmoid(logits.flatten(2).amax(-1))[0].to(torch.float64).numpy()
    oriented_px = prepared.model_camera.pixels_to(prepared.oriented_camera, model_px)
    inside = prepared.oriented_camera.contains(oriented_px).numpy()
    present = inside & (peak >= FOUND_PROBABILITY)
    visibility = None
    if seg_logits is not None:
        bones = torch.tensor(landmark_bone_matrix(names, classes))
        visibility = discrete_visibility(logits, seg_logits, bones)[0].numpy().astype(np.float64)
        present = present & (visibility == 1)
    registration = None
    if ct is not None:
        votes = present | (~prepared.model_camera.contains(model_px).numpy() & (peak >= FOUND_PROBABILITY))  # margin peaks too
        registration = register(oriented_px, votes, ct, prepared)
    return ImagePrediction(
        xray=xray,
        prepared=prepared,
        landmark_names=names,
        points_px=prepared.from_oriented_px(oriented_px).numpy(),
        model_px=model_px.numpy(),
        peak_probability=peak,
        present=present,
        registration=registration,
        flip_test=flip is not None,
        visibility=visibility,
    )


def register(oriented_px: torch.Tensor, present: np.ndarray, ct: CTLandmarks, prepared: Prepared) -> Registration:
    """The robust pose of the ``present`` landmarks, the voting ones (pixels of the turned image), and the CT landmarks
    projected under it."""
    from pelmark.geometry import project
    from pelmark.registration import register_robust
    from pelmark.registration.robust import unconfirmed

    camera = prepared.oriented_camera
    weights = torch.from_numpy(present.astype(np.float64))[None]
    landmarks = torch.where(weights[..., None] > 0, oriented_px[None].to(torch.float64), torch.zeros(1, *oriented_px.shape, dtype=torch.float64))
    points = torch.from_numpy(np.asarray(ct.points_world_mm, dtype=np.float64))[None]
    with torch.no_grad():
        robust = register_robust(landmarks, weights, points, camera)
        pose = robust.result.pose.detach().to(torch.float64)
        projected = project(points, pose, camera)[0]
    inliers = robust.inliers[0].numpy().astype(bool) & present
    degenerate = bool(robust.result.degenerate[0])
    return Registration(
        pose=pose[0].numpy(),
        degenerate=degenerate,
        inliers=inliers,
        unconfirmed=bool(unconfirmed(degenerate, inliers)),
        reprojected_px=prepared.from_oriented_px(projected).numpy(),
    )


@dataclasses.dataclass(frozen=True)
class PredictReport:
    """What a batch did: the files written per image, and the files that failed with why."""

    written: tuple[tuple[Path, tuple[Path, ...]], ...]
    failures: tuple[tuple[Path, str], ...]


def predict_files(
    paths: Sequence[Path],
    model: HeatmapModel,
    out: Path,
    settings: ReadSettings,
    ct: CTLandmarks | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    flip: tuple[int, ...] | None = None,
) -> PredictReport:
    """Predict every file into ``out``; a bad file is reported through ``echo`` as one line and the others go on.

    Args:
        paths: the X-ray files.
        model: the heatmap model.
        out: the folder for the per-image files (:func:`pelmark.infer.outputs.write_prediction`).
        settings: what the command line says about the files.
        ct: the CT landmarks to register to, if any.
        progress: show a progress bar.
        echo: where the one-line errors go; stderr, above the progress bar, by default.
        flip: the flip test's channel order (:func:`pelmark.train.model.choose_flip_order`), or None for one pass.
    """
    from tqdm import tqdm

    echo = echo or (lambda line: tqdm.write(line, file=sys.stderr))

    from pelmark.infer.outputs import output_stems, write_prediction

    stems = output_stems(paths)
    written, failures = [], []
    bar = tqdm(list(zip(paths, stems)), desc="predict", unit="image", disable=not progress, dynamic_ncols=True)
    for path, stem in bar:
        try:
            prediction = predict_image(Path(path), model, settings, ct, flip)
            written.append((Path(path), write_prediction(prediction, out, stem, model.name)))
        except PelmarkError as error:
            message = error.message if error.path is not None else str(error)
            failures.append((Path(path), message))
            echo(f"error: {path}: {message}")
    return PredictReport(tuple(written), tuple(failures))

"""Ground truth of a store split, and a trained model's argmax predictions on it.

Everything here lives at model resolution: a run of size S sees each
store image resized to S x S (no crop, no augmentation), through the camera
``store_camera.resized(S, S)``, exactly as in training. Predictions are the
argmax of each landmark's heatmap, as the paper evaluates, with the sigmoid
of the heatmap's peak (the model's confidence); the logits are computed in
float32 (no autocast) so that nearly equal pixels are not tied by a coarse
dtype. With the flip test (:func:`flip_choice`, ``pelmark eval``'s default
where the landmarks have left/right pairs) the logits are the mean of the
image's and its mirror image's (:func:`pelmark.train.model.flip_test`). A
segmentation-informed model (:mod:`pelmark.train.seg_informed`) also
gives its bone label map and its own call of which landmarks are present
(seed 003's visibility v̂ > 0).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pelmark.devices import resolve_device
from pelmark.errors import PelmarkError
from pelmark.evaluate.units import Unit, point_errors
from pelmark.geometry import Camera, grid_edge_distance
from pelmark.landmark_sets import landmark_bone_matrix
from pelmark.store import Split, StoreReader
from pelmark.train.checkpoint import TrainedRun
from pelmark.train.data import DataSettings, StoreDataset
from pelmark.train.model import choose_flip_order, flip_test, output_channels
from pelmark.train.seg_informed import argmax_on_bone, canvas_margin, discrete_visibility, image_argmax, split_outputs


# A landmark is found when the sigmoid of its heatmap's peak reaches 0.5: the
# BCE-trained model's own pixel decision ("this pixel is on the landmark"), a
# fixed rule that is not tuned on any split.
FOUND_PROBABILITY = 0.5


def model_camera(camera: Camera, size: int) -> Camera:
    """The camera of a whole store image resized to the square model input."""
    return camera.resized(size, size)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitTruth:
    """The true landmarks of one split at one model size.

    Attributes:
        split: which split.
        rows: (N,) store rows, ascending.
        subject_ids: (N,) subject id of each row.
        true_px: (N, L, 2) true landmarks in model px (x = column, y = row).
        visible: (N, L) visible in the store and inside the model image.
        poses: (N, 6) θ of each image.
        landmarks_3d: (N, L, 3) world mm.
        model_camera: camera of the model input.
        store_camera: the store's detector.
    """

    split: Split
    rows: np.ndarray
    subject_ids: np.ndarray
    true_px: np.ndarray
    visible: np.ndarray
    poses: np.ndarray
    landmarks_3d: np.ndarray
    model_camera: Camera
    store_camera: Camera

    @property
    def size(self) -> int:
        return self.model_camera.width

    @property
    def n_images(self) -> int:
        return len(self.rows)


def read_truth(store_path: Path, split: Split, size: int) -> SplitTruth:
    """Read the landmarks and poses of ``split`` (no images) and map them to model size ``size``.

    Raises:
        PelmarkError: the store has no finished images in ``split``.
    """
    reader = StoreReader(store_path)
    group = reader.group
    rows = reader.rows(split)
    if len(rows) == 0:
        raise PelmarkError(f"store has no {split.label} images (from finished subjects)", store_path)
    camera = reader.camera
    model = model_camera(camera, size)
    store_px = torch.from_numpy(np.asarray(group["landmarks_2d"][:], dtype=np.float64)[rows])
    true_px = camera.pixels_to(model, store_px)
    visible = np.asarray(group["visible"][:], dtype=bool)[rows] & model.contains(true_px).numpy()
    ids = np.array(reader.subject_ids, dtype=object)
    return SplitTruth(
        split=split,
        rows=rows,
        subject_ids=ids[np.asarray(group["subject"][:])[rows]],
        true_px=true_px.numpy(),
        visible=visible,
        poses=np.asarray(group["pose"][:], dtype=np.float64)[rows],
        landmarks_3d=np.asarray(group["landmarks_3d"][:], dtype=np.float64)[rows],
        model_camera=model,
        store_camera=camera,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Predictions:
    """One predictor's landmarks on one split.

    Attributes:
        model: the predictor's name (a run folder's name, or the reference's).
        truth: the split's ground truth at the predictor's model size.
        predicted_px: (N, L, 2) predicted landmarks in model px.
        peak_probability: (N, L) sigmoid of each heatmap's largest logit (the
            BCE-trained model's probability that its argmax is on the
            landmark); None for a predictor without heatmaps.
        present: (N, L) the model's own call that each landmark is in the image (a
            segmentation-informed model's v̂ > 0); None for a model without a visibility output.
        visibility: (N, L) that model's v̂ in {0, 0.5, 1}; None otherwise.
        on_bone: (N, L) for that model, whether the predicted class at each argmax (the nearest image pixel
            for one in a canvas margin) is one of the landmark's bones; None otherwise.
        segmentation: (N, S, S) uint8 predicted bone classes (0 = background) at model size; None
            for a model without a segmentation output.
    """

    model: str
    truth: SplitTruth
    predicted_px: np.ndarray
    peak_probability: np.ndarray | None = None
    present: np.ndarray | None = None
    visibility: np.ndarray | None = None
    on_bone: np.ndarray | None = None
    segmentation: np.ndarray | None = None

    def found(self) -> np.ndarray:
        """(N, L) the landmarks the model itself detects: peak probability >= :data:`FOUND_PROBABILITY`
        and the argmax inside the image (always, for a heatmap argmax on the image; a
        model with a canvas margin can peak outside it). All of them for a
        predictor without heatmaps (it has no way to say a landmark is absent).
        """
        inside = self.inside()
        if self.peak_probability is None:
            return inside
        return inside & (self.peak_probability >= FOUND_PROBABILITY)

    def inside(self) -> np.ndarray:
        """(N, L) the predicted points that lie in the image, pixel edges included (a model with a canvas
        margin can put its argmax outside)."""
        return self.truth.model_camera.contains(torch.from_numpy(np.asarray(self.predicted_px, dtype=np.float64))).numpy()

    def edge_distance(self) -> np.ndarray:
        """(N, L) signed distance (model px) of each predicted point to the image's nearest edge, negative outside
        (:func:`pelmark.geometry.grid_edge_distance`)."""
        camera = self.truth.model_camera
        points = torch.from_numpy(np.asarray(self.predicted_px, dtype=np.float64))
        return grid_edge_distance(points, camera.height, camera.width).numpy()

    def votes(self) -> np.ndarray:
        """(N, L) the landmarks that vote in the robust registration (``--refine``'s pose): the found ones
        (:meth:`found`), and for a model with a visibility output only those it places on one of their own
        bones (v̂ = 1). Seed 003's v̂ = 0.5 is the model's own flag of an anatomically inconsistent
        detection: the peak lies off its bone. On the demo cohort (three seeds, 10 epochs) leaving those
        out lowered seg-informed's ``+reg`` RMSE on novel subjects by 5-9 % (README, *Results*).

        A model with a canvas margin also votes with the landmarks it places outside the image, in the
        margin, with a peak of at least :data:`FOUND_PROBABILITY`: it is trained to put them where they
        project, and they are the landmarks (the ASIS) that fix the pose's lever arm. On the demo cohort
        that lowered the median mTRE of the robust pose on novel subjects by 5-15 mm and the ``+reg``
        RMSE by 6-8 % over three runs, with mixed novel views (+12, -12, +7 %; README, *Results*,
        round 11). They are not "present": a call of presence is about the image.
        """
        found = self.found()
        votes = found if self.visibility is None else found & (self.visibility == 1)
        if self.peak_probability is None:
            return votes
        return votes | (~self.inside() & (self.peak_probability >= FOUND_PROBABILITY))

    def errors(self) -> dict[Unit, np.ndarray]:
        """(N, L) error per unit; NaN where the landmark is not visible (left out of every metric)."""
        errors = point_errors(self.predicted_px, self.truth.true_px, self.truth.model_camera, self.truth.store_camera)
        return {unit: np.where(self.truth.visible, value, np.nan) for unit, value in errors.items()}


def run_classes(run: TrainedRun) -> tuple[str, ...]:
    """The bone classes of a segmentation-informed run's second decoder; () for a heatmap-only run."""
    return tuple(run.info.get("model_spec", {}).get("segmentation_classes") or ())


def flip_choice(run: TrainedRun, asked: bool | None) -> tuple[tuple[int, ...] | None, str | None]:
    """``run``'s flip-test order, or None and why not (:func:`pelmark.train.model.choose_flip_order`).

    Raises:
        PelmarkError: the flip test was asked for (``asked`` True) and the run cannot mirror.
    """
    try:
        order, why = choose_flip_order(run.landmark_names, run_classes(run), asked)
    except PelmarkError as error:
        raise PelmarkError(error.message, run.run_dir) from None
    return order, None if why is None else f"{run.name}: {why}"


@torch.no_grad()
def predict_split(
    run: TrainedRun,
    store_path: Path,
    truth: SplitTruth,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
    flip: tuple[int, ...] | None = None,
) -> Predictions:
    """The argmax landmarks of ``run``'s model on the images of ``truth`` (model px).

    The model runs on the device its weights are on. With ``flip`` (the output channels' mirror
    order, :func:`flip_choice`), its logits are the flip test's (:func:`pelmark.train.model.flip_test`).

    Raises:
        PelmarkError: the run has no model (diverged before any checkpoint) or
            its output channels do not match the store's landmarks.
    """
    from tqdm import tqdm

    if run.model is None:
        raise PelmarkError("run has no weights to evaluate", run.run_dir)
    if truth.size != run.config.size:
        raise PelmarkError(f"ground truth at size {truth.size} but the run's model size is {run.config.size}", run.run_dir)
    device = next(run.model.parameters()).device
    dataset = StoreDataset(store_path, DataSettings(size=run.config.size, splits=(truth.split,), targets=False), indices=truth.rows)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    n_landmarks = truth.true_px.shape[1]
    classes = run_classes(run)
    bones = torch.tensor(landmark_bone_matrix(run.landmark_names, classes)) if classes else None
    expected = output_channels(n_landmarks, classes)
    predicted, peaks, rows, visibility, on_bone, segmentation = [], [], [], [], [], []
    for batch in tqdm(loader, desc=f"{run.name} {truth.split.label}", unit="batch", disable=not progress, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True)
        outputs = run.model(images).float() if flip is None else flip_test(lambda x: run.model(x).float(), images, flip)
        if outputs.shape[1] != expected:
            raise PelmarkError(f"model predicts {outputs.shape[1] - expected + n_landmarks} landmarks, the store has {n_landmarks}", run.run_dir)
        margin = canvas_margin(outputs, images.shape)
        logits, seg_logits = split_outputs(outputs, n_landmarks, margin)
        points = image_argmax(logits, margin)
        predicted.append(points.cpu().numpy().astype(np.float64))
        peaks.append(torch.sigmoid(logits.flatten(2).amax(-1)).cpu().numpy().astype(np.float64))
        rows.append(np.asarray(batch["index"]))
        if bones is not None:
            visibility.append(discrete_visibility(logits, seg_logits, bones).cpu().numpy())
            on_bone.append(argmax_on_bone(points, seg_logits, bones).cpu().numpy())
            segmentation.append(seg_logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    if not np.array_equal(np.concatenate(rows), truth.rows):
        raise RuntimeError("predictions came back in another order than the store rows")
    seen = np.concatenate(visibility) if visibility else None
    return Predictions(
        run.name,
        truth,
        np.concatenate(predicted),
        peak_probability=np.concatenate(peaks),
        present=None if seen is None else seen > 0,
        visibility=seen,
        on_bone=np.concatenate(on_bone) if on_bone else None,
        segmentation=np.concatenate(segmentation) if segmentation else None,
    )

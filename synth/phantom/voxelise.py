"""Turn a phantom's anatomy into a CT: body, bones with cortical shells, noise, optional beads; and its bone labels.

The CT has ITK's identity LPS direction, so its RAS affine is
``diag(-s, -s, s)`` plus an origin, like most scanners' axial series.

The label volume (same grid) gives each voxel whose centre lies inside a bone
(signed distance < 0, where the CT's bone fraction passes one half) that bone's
class of :data:`~pelmark.landmark_sets.SEED003_CLASSES`, as value ``k + 1``;
0 elsewhere. The phantom's sacrum, coccyx included, is ``upper-sacrum``, and
its L4 and L5 are ``vertebrae``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pelmark.io.ct import LPS_RAS_FLIP, CTVolume
from pelmark.landmark_sets import SEED003_CLASSES
from pelmark.synth.phantom.anatomy import Anatomy
from pelmark.synth.phantom.sdf import bone_sdf_on_grid
from pelmark.synth.phantom.shape import PelvisShape

AIR_HU = -1000.0
MUSCLE_HU = 40.0
FAT_HU = -100.0
BEAD_HU = 3000.0
HU_FLOOR = -1024.0

FIELD_MARGIN_MM = 10.0  # air around the body
ABOVE_MM = 15.0  # above the iliac crests and L5
BELOW_MM = 40.0  # below the lesser trochanters

# The class of each phantom bone, by name (see the module docstring).
BONE_CLASSES = {
    "hip-l": "hemipelvis-l",
    "hip-r": "hemipelvis-r",
    "femur-l": "femur-l",
    "femur-r": "femur-r",
    "L4": "vertebrae",
    "L5": "vertebrae",
    "sacrum": "upper-sacrum",
}


@dataclasses.dataclass(frozen=True)
class BodyOutline:
    """The skin: an elliptic trunk that gives way to two thighs below the pelvis (RAS mm).

    Attributes:
        center_xy: the trunk's axis.
        half_axes: the trunk's half width and half depth.
        thigh_x: the thighs' axes lie at ``center_x ± thigh_x``.
        thigh_half_axes: half width and depth of each thigh.
        split_z: below ``split_z`` the trunk shrinks, gone ``split_mm`` lower.
        split_mm: height over which the trunk gives way to the thighs.
        fat_mm: thickness of subcutaneous fat.
    """

    center_xy: np.ndarray
    half_axes: np.ndarray
    thigh_x: float
    thigh_half_axes: np.ndarray
    split_z: float
    split_mm: float
    fat_mm: float

    def depth(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Approximate depth below the skin (mm, negative outside) on one axial slice."""
        trunk = np.clip((z - (self.split_z - self.split_mm)) / self.split_mm, 0.0, 1.0)
        dx, dy = x - self.center_xy[0], y - self.center_xy[1]
        depth = np.full(np.broadcast_shapes(x.shape, y.shape), -np.inf)
        if trunk > 0.0:
            depth = np.maximum(depth, _ellipse_depth(dx, dy, trunk * self.half_axes))
        for side in (-1.0, 1.0):
            depth = np.maximum(depth, _ellipse_depth(dx - side * self.thigh_x, dy, self.thigh_half_axes))
        return depth


def _ellipse_depth(dx: np.ndarray, dy: np.ndarray, half_axes: np.ndarray) -> np.ndarray:
    a, b = half_axes
    f = (dx / a) ** 2 + (dy / b) ** 2 - 1.0
    grad = 2.0 * np.hypot(dx / a**2, dy / b**2)
    return -f / np.maximum(grad, 1e-9)


def body_outline(anatomy: Anatomy, shape: PelvisShape) -> BodyOutline:
    """A skin that holds the skeleton with ``shape.soft_tissue_mm`` beside the trochanters."""
    corners = np.array(np.meshgrid(*zip(anatomy.view_lo, anatomy.view_hi), indexing="ij")).reshape(3, -1).T
    view = anatomy.to_ras(corners)
    femora = [b for b in anatomy.bones if b.name.startswith("femur")]
    lateral = max(np.abs(anatomy.to_ras(np.array(b.bounds())))[:, 0].max() for b in femora)
    center_xy = np.array([0.0, 0.0])
    half_width = lateral + shape.soft_tissue_mm
    back = -view[:, 1].min() + 30.0 * shape.scale
    front = view[:, 1].max() + 40.0 * shape.scale
    half_depth = max(shape.body_depth_ratio * half_width, back, front)
    symphysis_z = float(anatomy.to_ras(anatomy.symphysis.inferior)[2])
    return BodyOutline(
        center_xy=center_xy,
        half_axes=np.array([half_width, half_depth]),
        thigh_x=0.52 * half_width,
        thigh_half_axes=np.array([0.5 * half_width, 0.72 * half_depth]),
        split_z=symphysis_z - 45.0 * shape.scale,  # the perineum, below the ischial tuberosities
        split_mm=40.0 * shape.scale,
        fat_mm=shape.fat_mm,
    )


def ct_grid(anatomy: Anatomy, body: BodyOutline, spacing_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine (LPS identity direction) and shape of a CT holding the body and the skeleton's view box."""
    corners = np.array(np.meshgrid(*zip(anatomy.view_lo, anatomy.view_hi), indexing="ij")).reshape(3, -1).T
    view = anatomy.to_ras(corners)
    reach = body.half_axes + FIELD_MARGIN_MM
    lo = np.array([body.center_xy[0] - reach[0], body.center_xy[1] - reach[1], view[:, 2].min() - BELOW_MM])
    hi = np.array([body.center_xy[0] + reach[0], body.center_xy[1] + reach[1], view[:, 2].max() + ABOVE_MM])
    shape = tuple(int(np.ceil((h - l) / spacing_mm)) for l, h in zip(lo, hi))
    center = 0.5 * (lo + hi)
    direction = np.diag(LPS_RAS_FLIP)  # RAS axes of LPS index axes
    affine = np.eye(4)
    affine[:3, :3] = spacing_mm * direction
    affine[:3, 3] = center - affine[:3, :3] @ ((np.asarray(shape) - 1.0) / 2.0)
    return affine, shape


def _soft_tissue(body: BodyOutline, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    i, j = np.arange(shape[0]), np.arange(shape[1])
    x = (affine[0, 0] * i + affine[0, 3])[:, None]
    y = (affine[1, 1] * j + affine[1, 3])[None, :]
    hu = np.empty(shape, dtype=np.float32)
    for k in range(shape[2]):
        z = affine[2, 2] * k + affine[2, 3]
        depth = body.depth(x, y, z)
        hu[:, :, k] = np.where(depth < 0.0, AIR_HU, np.where(depth < body.fat_mm, FAT_HU, MUSCLE_HU))
    return hu


def _add_bones(
    hu: np.ndarray, labels: np.ndarray, anatomy: Anatomy, affine: np.ndarray, shape: PelvisShape, spacing_mm: float
) -> None:
    """Add the bones to ``hu`` and their classes to ``labels`` (a voxel inside two bones takes the deeper one)."""
    index_to_anatomy = np.linalg.inv(anatomy.anatomy_to_ras) @ affine
    depth = np.zeros(hu.shape, dtype=np.float32)  # how far inside its labelled bone each voxel lies (mm)
    for bone in anatomy.bones:
        result = bone_sdf_on_grid(bone, index_to_anatomy, hu.shape, bone.far_mm(spacing_mm))
        if result is None:
            continue
        block, d = result
        value = SEED003_CLASSES.index(BONE_CLASSES[bone.name]) + 1
        inside = (d < 0.0) & (-d > depth[block])
        labels[block] = np.where(inside, np.uint8(value), labels[block])
        depth[block] = np.where(inside, -d, depth[block])
        # Linear partial volume over one voxel, for the bone and for its cancellous core.
        bone_fraction = np.clip(0.5 - d / spacing_mm, 0.0, 1.0)
        core_fraction = np.clip(0.5 - (d + bone.cortical_mm) / spacing_mm, 0.0, 1.0)
        tissue = hu[block]
        hu[block] = (
            (1.0 - bone_fraction) * tissue
            + bone_fraction * shape.cortical_hu
            + core_fraction * (shape.cancellous_hu - shape.cortical_hu)
        )


def _add_beads(hu: np.ndarray, affine: np.ndarray, points_ras: np.ndarray, radius_vox: float) -> None:
    """Dense balls centred exactly on points, anti-aliased so their centroids are exact."""
    inv = np.linalg.inv(affine)
    reach = int(np.ceil(radius_vox + 1.0))
    for point in np.asarray(points_ras, dtype=np.float64):
        center = inv[:3, :3] @ point + inv[:3, 3]
        first = np.floor(center).astype(int) - reach
        grids = np.meshgrid(*[np.arange(f, f + 2 * reach + 2) for f in first], indexing="ij")
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, center)))
        weight = np.clip(radius_vox + 0.5 - dist, 0.0, 1.0)
        inside = (weight > 0) & np.all([(g >= 0) & (g < n) for g, n in zip(grids, hu.shape)], axis=0)
        idx = tuple(g[inside] for g in grids)
        hu[idx] = (1.0 - weight[inside]) * hu[idx] + weight[inside] * BEAD_HU


def voxelise(
    anatomy: Anatomy,
    shape: PelvisShape,
    spacing_mm: float,
    noise: np.random.Generator,
    beads_ras: np.ndarray | None = None,
    bead_radius_vox: float = 1.5,
) -> CTVolume:
    """The subject's CT in HU (:func:`voxelise_labelled` without the labels)."""
    return voxelise_labelled(anatomy, shape, spacing_mm, noise, beads_ras, bead_radius_vox)[0]


def voxelise_labelled(
    anatomy: Anatomy,
    shape: PelvisShape,
    spacing_mm: float,
    noise: np.random.Generator,
    beads_ras: np.ndarray | None = None,
    bead_radius_vox: float = 1.5,
) -> tuple[CTVolume, np.ndarray]:
    """The subject's CT in HU and its bone label volume.

    Args:
        anatomy: the skeleton and its placement.
        shape: the subject's shape (body size, fat, bone densities, noise level).
        spacing_mm: isotropic voxel size.
        noise: generator for the Gaussian noise (the only randomness here).
        beads_ras: optional (N, 3) RAS points that get dense beads.
        bead_radius_vox: bead radius in voxels.

    Returns:
        The CT, HU rounded to integers and stored as float32, and the (I, J, K) uint8 labels on its
        grid (see the module docstring).
    """
    body = body_outline(anatomy, shape)
    affine, grid_shape = ct_grid(anatomy, body, spacing_mm)
    hu = _soft_tissue(body, affine, grid_shape)
    labels = np.zeros(grid_shape, dtype=np.uint8)
    _add_bones(hu, labels, anatomy, affine, shape, spacing_mm)
    if beads_ras is not None:
        _add_beads(hu, affine, beads_ras, bead_radius_vox)
    hu += np.float32(shape.noise_hu) * noise.standard_normal(grid_shape, dtype=np.float32)
    np.rint(hu, out=hu)
    np.maximum(hu, np.float32(HU_FLOOR), out=hu)
    return CTVolume(hu=hu, affine_ras=affine), labels

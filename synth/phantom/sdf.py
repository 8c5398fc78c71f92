"""Signed-distance primitives and bones, evaluated with numpy on points or on a voxel grid.

A signed distance is negative inside a shape, zero on its surface and positive
outside, in millimetres. Only values near a surface matter to the phantom
(partial volume over a voxel, the cortical shell, the fillets of unions), so
distances are clamped to ± ``far_mm`` and a primitive is evaluated only inside
its bounding box grown by ``far_mm``: outside that box it cannot change the
clamped result. :meth:`Bone.far_mm` gives the smallest safe value for a voxel
size; a smaller value makes the sphere clouds' neighbour searches cheaper.

Some primitives give approximate distances away from their surface (the
ellipsoid, the ellipse); all of them have their zero level set exactly where
their geometry says, which is what the landmarks rely on.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
from scipy.spatial import cKDTree

FAR_MM = 12.0
"""Default clamp of distances evaluated at arbitrary points."""


class Primitive(abc.ABC):
    """A solid described by a signed distance in the anatomy frame (mm)."""

    @abc.abstractmethod
    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        """Signed distances (N,) of points (N, 3); values beyond ``far_mm`` may be reported as ``far_mm``."""

    @abc.abstractmethod
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box (lo, hi) holding the solid."""


def _norm(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", v, v))


@dataclasses.dataclass(frozen=True, eq=False)
class Sphere(Primitive):
    center: np.ndarray
    radius: float

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        return _norm(points - self.center) - self.radius

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.center - self.radius, self.center + self.radius


@dataclasses.dataclass(frozen=True, eq=False)
class RoundCone(Primitive):
    """The convex hull of two spheres (a capsule when the radii are equal); exact distance."""

    a: np.ndarray
    b: np.ndarray
    radius_a: float
    radius_b: float

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        # Inigo Quilez's exact round-cone distance, vectorised.
        ba = self.b - self.a
        l2 = float(ba @ ba)
        rr = self.radius_a - self.radius_b
        a2 = l2 - rr * rr
        il2 = 1.0 / l2
        pa = points - self.a
        y = pa @ ba
        z = y - l2
        off_axis = pa * l2 - y[:, None] * ba
        x2 = np.einsum("ni,ni->n", off_axis, off_axis)
        y2 = y * y * l2
        z2 = z * z * l2
        k = np.sign(rr) * rr * rr * x2
        to_b = np.sqrt(x2 + z2) * il2 - self.radius_b
        to_a = np.sqrt(x2 + y2) * il2 - self.radius_a
        side = (np.sqrt(x2 * a2 * il2) + y * rr) * il2 - self.radius_a
        return np.where(np.sign(z) * a2 * z2 > k, to_b, np.where(np.sign(y) * a2 * y2 < k, to_a, side))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.minimum(self.a - self.radius_a, self.b - self.radius_b)
        hi = np.maximum(self.a + self.radius_a, self.b + self.radius_b)
        return lo, hi


def _rotated_half_extent(rotation: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Half extent along the frame axes of a box with axes ``rotation`` columns and half sizes ``half``."""
    return np.abs(rotation) @ half


@dataclasses.dataclass(frozen=True, eq=False)
class Ellipsoid(Primitive):
    """An ellipsoid with semi-axes ``radii`` along the columns of ``rotation`` (approximate distance)."""

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        local = (points - self.center) @ self.rotation
        k0 = _norm(local / self.radii)
        k1 = np.maximum(_norm(local / self.radii**2), 1e-12)
        return k0 * (k0 - 1.0) / k1

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = _rotated_half_extent(self.rotation, self.radii)
        return self.center - half, self.center + half


@dataclasses.dataclass(frozen=True, eq=False)
class RoundBox(Primitive):
    """A box with half sizes ``half`` along the columns of ``rotation``, edges rounded by ``rounding``."""

    center: np.ndarray
    half: np.ndarray
    rotation: np.ndarray
    rounding: float

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        q = np.abs((points - self.center) @ self.rotation) - (self.half - self.rounding)
        outside = _norm(np.maximum(q, 0.0))
        inside = np.minimum(q.max(axis=1), 0.0)
        return outside + inside - self.rounding

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = _rotated_half_extent(self.rotation, self.half)
        return self.center - half, self.center + half


@dataclasses.dataclass(frozen=True, eq=False)
class HalfSpace(Primitive):
    """Points with ``(p - point) . normal <= 0``; only useful inside an :class:`Intersection`."""

    point: np.ndarray
    normal: np.ndarray

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        return (points - self.point) @ self.normal

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)


@dataclasses.dataclass(frozen=True, eq=False)
class Intersection(Primitive):
    parts: tuple[Primitive, ...]

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        return np.max([p.sdf(points, far_mm) for p in self.parts], axis=0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        boxes = [p.bounds() for p in self.parts]
        return np.max([b[0] for b in boxes], axis=0), np.min([b[1] for b in boxes], axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class EllipticCylinder(Primitive):
    """An ellipse (semi-axes along unit vectors ``axis_u``, ``axis_v``) extruded ± ``half_length``
    along ``axis_u x axis_v``. Its side surface is exactly the ellipse; the distance is approximate."""

    center: np.ndarray
    axis_u: np.ndarray
    axis_v: np.ndarray
    semi_u: float
    semi_v: float
    half_length: float

    @property
    def axis_w(self) -> np.ndarray:
        return np.cross(self.axis_u, self.axis_v)

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        rel = points - self.center
        s, t, w = rel @ self.axis_u, rel @ self.axis_v, rel @ self.axis_w
        f = (s / self.semi_u) ** 2 + (t / self.semi_v) ** 2 - 1.0
        grad = 2.0 * np.hypot(s / self.semi_u**2, t / self.semi_v**2)
        # f / |grad f| is the first-order distance; it is exact on the ellipse itself.
        d2 = np.maximum(f / np.maximum(grad, 1e-9), -min(self.semi_u, self.semi_v))
        dw = np.abs(w) - self.half_length
        return np.hypot(np.maximum(d2, 0.0), np.maximum(dw, 0.0)) + np.minimum(np.maximum(d2, dw), 0.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        axes = np.stack([self.axis_u, self.axis_v, self.axis_w], axis=1)
        half = _rotated_half_extent(axes, np.array([self.semi_u, self.semi_v, self.half_length]))
        return self.center - half, self.center + half


@dataclasses.dataclass(frozen=True, eq=False)
class SphereCloud(Primitive):
    """The union of many spheres: tubes along sampled curves, thick sheets on sampled surfaces.

    The distance is that of the best of the ``k`` nearest centres, which is the
    union's distance wherever radii vary slowly between neighbouring samples.
    """

    centers: np.ndarray
    radii: np.ndarray
    k: int = 6

    def __post_init__(self):
        object.__setattr__(self, "_tree", cKDTree(self.centers))
        object.__setattr__(self, "_radii_padded", np.append(self.radii, 0.0))

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        k = min(self.k, len(self.centers))
        # The search radius sets the cost: only centres that can give a distance below far_mm.
        bound = float(self.radii.max()) + far_mm
        dist, index = self._tree.query(points, k=k, distance_upper_bound=bound)
        dist, index = dist.reshape(len(points), k), index.reshape(len(points), k)
        d = np.where(np.isfinite(dist), dist - self._radii_padded[index], far_mm)
        return d.min(axis=1)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radii[:, None]
        return (self.centers - r).min(axis=0), (self.centers + r).max(axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class Sweep(Primitive):
    """A rounded-rectangle cross-section swept along a densely sampled curve.

    At sample i the section spans ± ``half_width[i]`` along ``lateral[i]`` and
    ± ``half_depth[i]`` along ``tangent[i] x lateral[i]``, corners rounded by
    ``rounding[i]``; the ends are flat. The curve's radius of curvature must
    exceed the section's half depth.
    """

    curve: np.ndarray
    tangent: np.ndarray
    lateral: np.ndarray
    half_width: np.ndarray
    half_depth: np.ndarray
    rounding: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "_tree", cKDTree(self.curve))
        object.__setattr__(self, "_normal", np.cross(self.tangent, self.lateral))

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        _, i = self._tree.query(points, k=1)
        rel = points - self.curve[i]
        along = np.einsum("ni,ni->n", rel, self.tangent[i])
        x = np.abs(np.einsum("ni,ni->n", rel, self.lateral[i]))
        y = np.abs(np.einsum("ni,ni->n", rel, self._normal[i]))
        r = self.rounding[i]
        qx, qy = x - (self.half_width[i] - r), y - (self.half_depth[i] - r)
        section = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0) - r
        # Beyond the first or last sample the sweep ends in a flat cap.
        past = np.where(i == 0, -along, np.where(i == len(self.curve) - 1, along, -np.inf))
        return np.hypot(np.maximum(section, 0.0), np.maximum(past, 0.0)) + np.minimum(np.maximum(section, past), 0.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = np.hypot(self.half_width, self.half_depth)[:, None]
        return (self.curve - reach).min(axis=0), (self.curve + reach).max(axis=0)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: a union whose joints are filleted over about ``k`` mm."""
    if k <= 0.0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


@dataclasses.dataclass(frozen=True, eq=False)
class Bone:
    """One bone: a smooth union of parts, minus holes, with a cortical shell.

    Attributes:
        name: for messages and tests.
        parts: solids united with fillets of ``blend_mm``.
        holes: solids cut out afterwards with sharp edges (foramina, sockets, canals).
        blend_mm: fillet size of the union.
        cortical_mm: thickness of the cortical shell inside the surface.
    """

    name: str
    parts: tuple[Primitive, ...]
    holes: tuple[Primitive, ...] = ()
    blend_mm: float = 3.0
    cortical_mm: float = 1.5

    def far_mm(self, spacing_mm: float) -> float:
        """The smallest clamp that leaves a CT of this voxel size unchanged: fillets and
        cortical shells need distances a little beyond their size, partial volume half a voxel."""
        return max(self.blend_mm, self.cortical_mm) + spacing_mm

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        boxes = [p.bounds() for p in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def sdf(self, points: np.ndarray, far_mm: float = FAR_MM) -> np.ndarray:
        """Signed distances (N,) of anatomy-frame points (N, 3), clamped to ± ``far_mm``."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        acc = np.full(len(points), far_mm)
        for part in self.parts:
            inside = _in_box(points, part.bounds(), far_mm)
            if inside.any():
                acc[inside] = _blend(acc[inside], part.sdf(points[inside], far_mm), self.blend_mm, far_mm)
        for hole in self.holes:
            inside = _in_box(points, hole.bounds(), far_mm)
            if inside.any():
                acc[inside] = np.maximum(acc[inside], -hole.sdf(points[inside], far_mm))
        return np.clip(acc, -far_mm, far_mm)


def _blend(acc: np.ndarray, part: np.ndarray, blend_mm: float, far_mm: float) -> np.ndarray:
    """Smooth union where the part is within reach; a value of ``far_mm`` means "at least that far",
    and blending two of those would pull the far field towards the surface."""
    near = part < far_mm
    out = acc.copy()
    out[near] = smooth_min(acc[near], part[near], blend_mm)
    return out


def _in_box(points: np.ndarray, box: tuple[np.ndarray, np.ndarray], pad: float) -> np.ndarray:
    lo, hi = box
    return np.all((points >= lo - pad) & (points <= hi + pad), axis=1)


# ---------------------------------------------------------------- voxel grids


def _index_box(
    box: tuple[np.ndarray, np.ndarray], pad: float, frame_to_index: np.ndarray, shape: tuple[int, int, int]
) -> tuple[slice, slice, slice] | None:
    """Index slices of the voxels whose centres may lie inside ``box`` grown by ``pad``."""
    lo, hi = box[0] - pad, box[1] + pad
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    index = corners @ frame_to_index[:3, :3].T + frame_to_index[:3, 3]
    first = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    last = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, shape)
    if np.any(last <= first):
        return None
    return tuple(slice(int(f), int(e)) for f, e in zip(first, last))


def bone_sdf_on_grid(
    bone: Bone, index_to_frame: np.ndarray, shape: tuple[int, int, int], far_mm: float
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """A bone's clamped signed distance on the voxels of its bounding box.

    Each part is evaluated only on the sub-block of voxels its own box can
    reach, which is what keeps a subject to seconds.

    Args:
        bone: the bone, in the anatomy frame.
        index_to_frame: 4x4 map from voxel index (i, j, k) to the anatomy frame.
        shape: the grid's shape.
        far_mm: clamp distance (see :meth:`Bone.far_mm`).

    Returns:
        The index slices of the box and the float32 distances there, or None
        when the bone lies outside the grid.
    """
    frame_to_index = np.linalg.inv(index_to_frame)
    block = _index_box(bone.bounds(), far_mm, frame_to_index, shape)
    if block is None:
        return None
    ranges = [np.arange(s.start, s.stop, dtype=np.float64) for s in block]
    coords = (
        index_to_frame[:3, 3]
        + ranges[0][:, None, None, None] * index_to_frame[:3, 0]
        + ranges[1][None, :, None, None] * index_to_frame[:3, 1]
        + ranges[2][None, None, :, None] * index_to_frame[:3, 2]
    )
    block_shape = coords.shape[:3]
    acc = np.full(block_shape, far_mm)

    def sub_block(primitive: Primitive):
        local = _index_box(primitive.bounds(), far_mm, frame_to_index, shape)
        if local is None:
            return None
        sub = tuple(
            slice(max(l.start - b.start, 0), min(l.stop - b.start, n))
            for l, b, n in zip(local, block, block_shape)
        )
        return None if any(s.stop <= s.start for s in sub) else sub

    for part in bone.parts:
        sub = sub_block(part)
        if sub is not None:
            d = part.sdf(coords[sub].reshape(-1, 3), far_mm)
            acc[sub] = _blend(acc[sub].reshape(-1), d, bone.blend_mm, far_mm).reshape(acc[sub].shape)
    for hole in bone.holes:
        sub = sub_block(hole)
        if sub is not None:
            d = hole.sdf(coords[sub].reshape(-1, 3), far_mm)
            acc[sub] = np.maximum(acc[sub], -d.reshape(acc[sub].shape))
    return block, np.clip(acc, -far_mm, far_mm).astype(np.float32)

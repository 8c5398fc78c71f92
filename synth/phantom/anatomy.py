"""The phantom skeleton: hip bones, sacrum and coccyx, L5 (and the lower L4), proximal femora.

Geometry lives in the *anatomy frame*: RAS axes (x to the patient's right,
y anterior, z superior), millimetres, origin midway between the two hip joint
centres, with the anterior pelvic plane (both ASIS and the symphysis) coronal.
:attr:`Anatomy.anatomy_to_ras` places that frame in the scanner, including the
subject's tilt.

The reference coordinates below describe an average adult's right side; a
subject's bones are the reference scaled, widened, made asymmetric and flared
by its :class:`~.shape.PelvisShape`, and mirrored for the left side. The
features that define landmarks (each obturator foramen's ellipse, each ASIS
spine, the symphysis) are built first as :class:`Foramen`, :class:`Spine` and
:class:`Symphysis`, and the bones are built from them, so
:mod:`.landmarks` can read exact landmark positions off those features.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pelmark.synth.phantom.curves import catmull_rom, resample, tangents
from pelmark.synth.phantom.sdf import (
    Bone,
    Ellipsoid,
    EllipticCylinder,
    HalfSpace,
    Intersection,
    Primitive,
    RoundBox,
    RoundCone,
    Sphere,
    SphereCloud,
    Sweep,
)
from pelmark.synth.phantom.shape import PelvisShape, Side

SAMPLE_MM = 0.7
"""Sample spacing of tubes; far below their radii, so their surfaces are smooth."""
SHEET_SAMPLE_MM = 1.0
"""Sample spacing of the iliac sheet: its surface ripples by spacing² / (8 x half thickness) < 0.1 mm."""

SCANNER_OFFSET_RAS = np.array([0.0, 0.0, -180.0])
"""Where the skeleton's origin sits in scanner RAS, before the subject's shift: a table position."""

# ---------------------------------------------------------------- reference right side (mm)

HIP_CENTER = np.array([85.0, 0.0, 0.0])
HEAD_RADIUS = 23.5
SOCKET_RADIUS = 26.0  # the 2.5 mm between socket and head is the joint's cartilage
ACETABULUM_RADIUS = 34.0
ACETABULUM_OPENING = np.array([0.664, 0.242, -0.707])  # 45 deg inclination, 20 deg anteversion
ASYMMETRY_PIVOT_X = 45.0  # the sacro-iliac joints stay put when a hemipelvis widens
FLARE_PIVOT_Z = 40.0  # the iliac wing flares about a line above the acetabulum

CREST = np.array(
    [[42, -91, 97], [66, -82, 116], [98, -55, 128], [126, -24, 122], [137, 2, 106], [127, 22, 86]], dtype=float
)
CREST_RADIUS = np.array([7.0, 5.0, 5.0, 6.5, 6.5, 5.0])
ILIUM_LOWER = np.array([[46, -80, 70], [58, -57, 52], [74, -28, 38], [90, 2, 33], [104, 26, 44]], dtype=float)
ILIUM_LOWER_RADIUS = np.array([5.0, 4.5, 6.0, 7.0, 5.0])  # thick bone above the acetabulum
ILIUM_BULGE_MM = 7.0
ASIS_SPINE_END = np.array([124.0, 34.0, 78.0])
ASIS_SPINE_RADIUS = 5.5
PSIS = np.array([42.0, -93.0, 95.0])
AIIS = np.array([104.0, 28.0, 44.0])
SI_BLOCK = np.array([50.0, -66.0, 78.0])
BRIM = np.array([[42, -42, 68], [55, -22, 46], [62, 2, 24], [60, 24, 8], [44, 33, -4], [28, 37, -11]], dtype=float)
BRIM_RADIUS = np.array([6.0, 6.0, 6.5, 7.0, 6.5, 6.0])

FORAMEN_CENTER = np.array([42.0, 22.0, -42.0])
FORAMEN_NORMAL = np.array([0.45, 0.85, -0.28])  # the foramen faces antero-latero-inferiorly
RING_RADIUS = {"superior": 6.5, "medial": 7.0, "inferior": 5.5, "lateral": 8.0}
RING_OVERLAP = 0.55  # the ring's centre line sits this many radii outside the foramen's ellipse

SYMPHYSIS_TOP = np.array([0.0, 36.0, -20.0])
SYMPHYSIS_HEIGHT = 38.0
SYMPHYSIS_INCLINATION_DEG = 25.0  # the joint's lower end lies posterior of its upper end
SYMPHYSIS_GAP = 3.0
PUBIC_BODY_ROUNDING = 1.5
PUBIC_BODY_HALF = np.array([9.0, 7.5])  # left-right, antero-posterior

FEMUR_SHAFT = np.array([-math.sin(math.radians(8.0)), 0.0, -math.cos(math.radians(8.0))])  # distal
FEMUR_NECK = np.array([-0.68, 0.145, 0.719]) / np.linalg.norm([-0.68, 0.145, 0.719])  # towards the head
NECK_LENGTH = 50.0

SACRUM_LINE = np.array([[0, -37, 89], [0, -52, 68], [0, -66, 44], [0, -76, 20], [0, -80, 0]], dtype=float)
SACRUM_PROFILE = {  # along the sacrum, from S1 to the apex
    "at": [0.0, 0.15, 0.4, 0.7, 1.0],
    "half_width": [41.0, 40.0, 32.0, 20.0, 11.0],
    "half_depth": [16.0, 15.0, 12.0, 9.0, 6.5],
}
COCCYX = np.array([[0, -80, 0], [0, -79, -14], [0, -74, -26], [0, -67, -35]], dtype=float)
COCCYX_RADIUS = np.array([7.0, 5.5, 4.5, 3.0])

L5_AXIS = np.array([0.0, 0.34, 0.94]) / np.linalg.norm([0.0, 0.34, 0.94])
L4_AXIS = np.array([0.0, 0.14, 0.99]) / np.linalg.norm([0.0, 0.14, 0.99])
VERTEBRA_HALF_HEIGHT = 13.5
DISC_HEIGHT = 10.0


# ---------------------------------------------------------------- landmark-defining features


@dataclasses.dataclass(frozen=True)
class Foramen:
    """An obturator foramen's rim: the ellipse ``center + a cos(t) major + b sin(t) minor``."""

    center: np.ndarray
    major: np.ndarray
    minor: np.ndarray
    semi_major: float
    semi_minor: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.major, self.minor)

    def point(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)[..., None]
        return self.center + self.semi_major * np.cos(t) * self.major + self.semi_minor * np.sin(t) * self.minor

    def extreme(self, direction: np.ndarray) -> np.ndarray:
        """The rim point furthest along ``direction``."""
        c = np.array([self.semi_major * self.major @ direction, self.semi_minor * self.minor @ direction])
        return self.point(math.atan2(c[1], c[0]))


@dataclasses.dataclass(frozen=True)
class Spine:
    """An anterior superior iliac spine: a round cone from ``base`` to a rounded ``end``
    (the spine points forwards, so the sphere capping ``end`` holds its most anterior point)."""

    base: np.ndarray
    end: np.ndarray
    radius: float

    @property
    def tip(self) -> np.ndarray:
        """The spine's most anterior point, on the sphere that caps ``end``."""
        return self.end + self.radius * np.array([0.0, 1.0, 0.0])


@dataclasses.dataclass(frozen=True)
class Symphysis:
    """The pubic symphysis: the midline ends of the joint and the width of its gap."""

    superior: np.ndarray
    inferior: np.ndarray
    gap_mm: float


@dataclasses.dataclass(frozen=True, eq=False)
class Anatomy:
    """A subject's skeleton in the anatomy frame and its place in the scanner.

    Attributes:
        bones: every bone, each with its own cortical shell.
        foramina: obturator foramina, (left, right).
        spines: anterior superior iliac spines, (left, right).
        symphysis: the pubic symphysis.
        anatomy_to_ras: 4x4 map from the anatomy frame to scanner RAS mm.
        view_lo, view_hi: anatomy-frame box that a CT of this subject must show
            (from below the lesser trochanters to above L5 and the iliac crests).
    """

    bones: tuple[Bone, ...]
    foramina: tuple[Foramen, Foramen]
    spines: tuple[Spine, Spine]
    symphysis: Symphysis
    anatomy_to_ras: np.ndarray
    view_lo: np.ndarray
    view_hi: np.ndarray

    def foramen(self, side: Side) -> Foramen:
        return self.foramina[0 if side is Side.LEFT else 1]

    def spine(self, side: Side) -> Spine:
        return self.spines[0 if side is Side.LEFT else 1]

    def bone(self, name: str) -> Bone:
        return next(b for b in self.bones if b.name == name)

    def bone_sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance to the nearest bone (clamped), for anatomy-frame points (N, 3)."""
        return np.min([b.sdf(points) for b in self.bones], axis=0)

    def to_ras(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return points @ self.anatomy_to_ras[:3, :3].T + self.anatomy_to_ras[:3, 3]


# ---------------------------------------------------------------- reference to subject


@dataclasses.dataclass(frozen=True)
class _SideMap:
    """Maps reference right-side coordinates to one side of a subject (mirrored for the left)."""

    shape: PelvisShape
    side: Side

    @property
    def scale(self) -> float:
        return self.shape.scale

    def point(self, ref: np.ndarray, flare: bool = False) -> np.ndarray:
        ref = np.asarray(ref, dtype=np.float64)
        s, sign = self.shape.scale, self.side.sign
        widen = 1.0 + sign * self.shape.asymmetry
        x = s * self.shape.width * (ASYMMETRY_PIVOT_X + (ref[..., 0] - ASYMMETRY_PIVOT_X) * widen)
        if flare:
            lift = np.maximum(ref[..., 2] - FLARE_PIVOT_Z, 0.0)
            x = x + s * math.tan(math.radians(self.shape.flare_of(self.side))) * lift
        return np.stack([sign * x, s * ref[..., 1], s * ref[..., 2]], axis=-1)

    def vector(self, ref: np.ndarray) -> np.ndarray:
        v = np.asarray(ref, dtype=np.float64) * np.array([self.side.sign, 1.0, 1.0])
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def length(self, ref_mm: float | np.ndarray) -> float | np.ndarray:
        return self.shape.scale * ref_mm


def _midline_point(shape: PelvisShape, ref: np.ndarray) -> np.ndarray:
    ref = np.asarray(ref, dtype=np.float64)
    return ref * np.array([shape.scale * shape.width, shape.scale, shape.scale])


def _tube(curve: np.ndarray, radii: np.ndarray) -> SphereCloud:
    """A tube of radius ``radii`` (one per control point, interpolated) along a sampled curve."""
    dense = catmull_rom(curve, SAMPLE_MM)
    at_control = np.linspace(0.0, 1.0, len(radii))
    return SphereCloud(dense, np.interp(np.linspace(0.0, 1.0, len(dense)), at_control, radii))


def _rotation(tilt_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.radians(tilt_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------- features


def _in_plane_axes(normal: np.ndarray, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in the plane with this normal: the steepest upward one, and the lateral one."""
    vertical = np.array([0.0, 0.0, 1.0]) - normal[2] * normal
    vertical /= np.linalg.norm(vertical)
    lateral = np.cross(normal, vertical)
    return vertical, lateral * np.sign(lateral[0]) * side.sign


def _foramen(shape: PelvisShape, side: Side) -> Foramen:
    m = _SideMap(shape, side)
    params = shape.foramen_of(side)
    vertical, lateral = _in_plane_axes(m.vector(FORAMEN_NORMAL), side)
    angle = math.radians(params.angle_deg)
    major = math.cos(angle) * vertical + math.sin(angle) * lateral
    minor = -math.sin(angle) * vertical + math.cos(angle) * lateral
    return Foramen(
        center=m.point(FORAMEN_CENTER),
        major=major,
        minor=minor,
        semi_major=m.length(params.semi_major_mm),
        semi_minor=m.length(params.semi_minor_mm),
    )


def _spine(shape: PelvisShape, side: Side) -> Spine:
    m = _SideMap(shape, side)
    return Spine(
        base=m.point(CREST[-1], flare=True),
        end=m.point(ASIS_SPINE_END, flare=True),
        radius=m.length(ASIS_SPINE_RADIUS),
    )


def _symphysis(shape: PelvisShape) -> Symphysis:
    incline = math.radians(SYMPHYSIS_INCLINATION_DEG)
    down = np.array([0.0, -math.sin(incline), -math.cos(incline)])
    top = _midline_point(shape, SYMPHYSIS_TOP)
    return Symphysis(
        superior=top,
        inferior=top + shape.scale * SYMPHYSIS_HEIGHT * down,
        gap_mm=shape.scale * SYMPHYSIS_GAP,
    )


# ---------------------------------------------------------------- bones


def _ilium_sheet(m: _SideMap) -> SphereCloud:
    """The iliac wing: a curved plate lofted between the crest and the line above the acetabulum."""
    crest = catmull_rom(m.point(CREST, flare=True), SHEET_SAMPLE_MM)
    lower = catmull_rom(m.point(ILIUM_LOWER), SHEET_SAMPLE_MM)
    n_along = max(len(crest), len(lower))
    crest, lower = resample(crest, n_along), resample(lower, n_along)
    height = np.linalg.norm(crest - lower, axis=1).max()
    sigma = np.linspace(0.0, 1.0, int(np.ceil(height / SHEET_SAMPLE_MM)) + 1)[None, :, None]
    along = np.linspace(0.0, 1.0, n_along)[:, None, None]
    outward = np.array([m.side.sign, 0.0, 0.0])
    bulge = m.length(ILIUM_BULGE_MM) * 4.0 * sigma * (1.0 - sigma) * np.sin(np.pi * along) * outward
    surface = (1.0 - sigma) * lower[:, None, :] + sigma * crest[:, None, :] + bulge
    # Half thickness: a thin fossa, thickening a little towards the acetabulum. The sheet stays
    # thin (its neighbour search costs the square of its largest radius); thick bone is in tubes.
    half = m.length(2.0 + 1.0 * (1.0 - sigma) ** 2) * np.ones_like(along)
    return SphereCloud(surface.reshape(-1, 3), np.broadcast_to(half, surface.shape[:2] + (1,)).reshape(-1))


def _foramen_ring(m: _SideMap, foramen: Foramen) -> SphereCloud:
    """The bony ring around the obturator foramen: pubic rami, pubic body and ischium."""
    t = np.linspace(0.0, 2.0 * np.pi, int(2.0 * np.pi * (foramen.semi_major + 8.0) / SAMPLE_MM), endpoint=False)
    direction = np.cos(t)[:, None] * foramen.major + np.sin(t)[:, None] * foramen.minor
    vertical, lateral = _in_plane_axes(foramen.normal, m.side)
    up, out = direction @ vertical, direction @ lateral
    radius = m.length(
        RING_RADIUS["superior"] * np.maximum(up, 0) ** 2
        + RING_RADIUS["inferior"] * np.maximum(-up, 0) ** 2
        + RING_RADIUS["lateral"] * np.maximum(out, 0) ** 2
        + RING_RADIUS["medial"] * np.maximum(-out, 0) ** 2
    )
    a = foramen.semi_major + RING_OVERLAP * radius
    b = foramen.semi_minor + RING_OVERLAP * radius
    centers = foramen.center + (a * np.cos(t))[:, None] * foramen.major + (b * np.sin(t))[:, None] * foramen.minor
    return SphereCloud(centers, radius)


def _pubic_body(shape: PelvisShape, side: Side, symphysis: Symphysis) -> Intersection:
    """The pubic body beside the symphysis: a flat medial face (the joint surface) and a
    rounded lateral side, a box cut by an ellipsoid centred on the joint."""
    up = symphysis.superior - symphysis.inferior
    height = float(np.linalg.norm(up))
    up /= height
    x = np.array([1.0, 0.0, 0.0])
    rotation = np.stack([x, np.cross(up, x), up], axis=1)
    half_x, half_y = shape.scale * PUBIC_BODY_HALF
    middle = 0.5 * (symphysis.superior + symphysis.inferior)
    center = middle + np.array([side.sign * (0.5 * symphysis.gap_mm + half_x), 0.0, 0.0])
    half = np.array([half_x, half_y, 0.5 * height])
    box = RoundBox(center, half, rotation, rounding=shape.scale * PUBIC_BODY_ROUNDING)
    # The ellipsoid holds the box's medial edges (it reaches 1.3 half heights), so the joint face stays flat.
    joint = middle + np.array([side.sign * 0.5 * symphysis.gap_mm, 0.0, 0.0])
    rounding = Ellipsoid(joint, np.array([2.0 * half_x, 2.0 * half_y, 0.65 * height]), rotation)
    return Intersection((box, rounding))


def _hip_bone(shape: PelvisShape, side: Side, foramen: Foramen, spine: Spine, symphysis: Symphysis) -> Bone:
    m = _SideMap(shape, side)
    hip = m.point(HIP_CENTER)
    opening = m.vector(ACETABULUM_OPENING)
    acetabulum = Intersection(
        (Sphere(hip, m.length(ACETABULUM_RADIUS)), HalfSpace(hip + m.length(3.0) * opening, opening))
    )
    crest = _tube(m.point(CREST, flare=True), m.length(CREST_RADIUS))
    parts: list[Primitive] = [
        acetabulum,
        _ilium_sheet(m),
        _tube(m.point(ILIUM_LOWER), m.length(ILIUM_LOWER_RADIUS)),
        crest,
        RoundCone(spine.base, spine.end, m.length(5.0), spine.radius),
        Sphere(m.point(AIIS), m.length(7.0)),
        Sphere(m.point(PSIS, flare=True), m.length(8.0)),
        Ellipsoid(m.point(SI_BLOCK), m.length(np.array([6.0, 16.0, 22.0]))),
        RoundCone(m.point([58, -55, 45]), m.point([74, -20, -12]), m.length(9.0), m.length(11.0)),  # posterior column
        RoundCone(m.point([78, -18, -22]), m.point([64, -22, -80]), m.length(11.0), m.length(11.0)),  # ischium
        Ellipsoid(m.point([63, -26, -84]), m.length(np.array([11.0, 15.0, 12.0]))),  # ischial tuberosity
        RoundCone(m.point([62, -30, -28]), m.point([47, -42, -34]), m.length(6.0), m.length(2.5)),  # ischial spine
        _tube(m.point(BRIM), m.length(BRIM_RADIUS)),  # arcuate line and superior pubic ramus
        _foramen_ring(m, foramen),
        _pubic_body(shape, side, symphysis),
        RoundCone(m.point([14, 18, -56]), m.point([56, -14, -80]), m.length(5.5), m.length(6.0)),  # inferior ramus
    ]
    holes = (
        Sphere(hip, m.length(SOCKET_RADIUS)),
        EllipticCylinder(
            foramen.center,
            foramen.major,
            foramen.minor,
            foramen.semi_major,
            foramen.semi_minor,
            half_length=m.length(16.0),
        ),
    )
    return Bone(f"hip-{side.value}", tuple(parts), holes, blend_mm=m.length(3.0), cortical_mm=2.0)


def _femoral_junction(m: _SideMap) -> np.ndarray:
    """Where the femoral neck's axis meets the shaft's axis."""
    return m.point(HIP_CENTER) - m.length(NECK_LENGTH) * m.vector(FEMUR_NECK)


def lesser_trochanter(shape: PelvisShape, side: Side) -> Sphere:
    """A subject's lesser trochanter; the CT reaches below it."""
    m = _SideMap(shape, side)
    outward, back = np.array([m.side.sign, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])
    center = _femoral_junction(m) + m.length(30.0) * m.vector(FEMUR_SHAFT) - m.length(14.0) * outward
    return Sphere(center + m.length(11.0) * back, m.length(9.0))


def _femur(shape: PelvisShape, side: Side) -> Bone:
    m = _SideMap(shape, side)
    hip = m.point(HIP_CENTER)
    shaft, neck = m.vector(FEMUR_SHAFT), m.vector(FEMUR_NECK)
    junction = _femoral_junction(m)
    outward = np.array([side.sign, 0.0, 0.0])
    up = np.array([0.0, 0.0, 1.0])
    back = np.array([0.0, -1.0, 0.0])
    L = m.length
    parts = (
        Sphere(hip, L(HEAD_RADIUS)),
        RoundCone(hip, hip - L(38.0) * neck, L(15.0), L(17.0)),  # neck
        Ellipsoid(junction + L(6.0) * up, L(np.array([19.0, 17.0, 25.0]))),  # intertrochanteric region
        Ellipsoid(junction + L(18.0) * outward + L(5.0) * back + L(24.0) * up, L(np.array([13.0, 19.0, 22.0]))),
        lesser_trochanter(shape, side),
        RoundCone(junction - L(20.0) * shaft, junction + L(50.0) * shaft, L(17.0), L(14.0)),
        RoundCone(junction + L(50.0) * shaft, junction + L(220.0) * shaft, L(14.0), L(13.5)),
    )
    canal = RoundCone(junction + L(70.0) * shaft, junction + L(260.0) * shaft, L(7.5), L(7.5))
    return Bone(f"femur-{side.value}", parts, (canal,), blend_mm=L(4.0), cortical_mm=2.5)


def _sacrum(shape: PelvisShape) -> Bone:
    curve = catmull_rom(_midline_point(shape, SACRUM_LINE), SAMPLE_MM)
    along = np.linspace(0.0, 1.0, len(curve))
    profile = {k: np.interp(along, SACRUM_PROFILE["at"], v) for k, v in SACRUM_PROFILE.items() if k != "at"}
    tangent = tangents(curve)
    lateral = np.tile([1.0, 0.0, 0.0], (len(curve), 1))
    width = shape.scale * shape.width * profile["half_width"]
    depth = shape.scale * profile["half_depth"]
    body = Sweep(curve, tangent, lateral, width, depth, 0.9 * np.minimum(width, depth))
    # Behind the body, the fused laminae and the median crest, with the sacral canal between.
    posterior = np.cross(tangent, lateral)  # the tangent runs down the sacrum
    back = curve + (depth + shape.scale * 9.0)[:, None] * posterior
    thin = np.full(len(curve), shape.scale * 5.0)
    arch = Sweep(back, tangent, lateral, 0.55 * width, thin, 0.8 * thin)
    facets = [
        RoundCone(
            _midline_point(shape, [sx * 17, -60, 95]),
            _midline_point(shape, [sx * 18, -66, 104]),
            shape.scale * 6.0,
            shape.scale * 5.0,
        )
        for sx in (-1.0, 1.0)
    ]
    coccyx = _tube(_midline_point(shape, COCCYX), shape.scale * COCCYX_RADIUS)
    # Four pairs of anterior sacral foramina, each a short channel through the bone.
    holes = []
    for at, offset, radius in zip((0.2, 0.4, 0.6, 0.77), (15.0, 13.5, 12.0, 10.0), (4.0, 3.5, 3.0, 2.5)):
        i = int(round(at * (len(curve) - 1)))
        for sx in (-1.0, 1.0):
            c = curve[i] + sx * shape.scale * shape.width * offset * lateral[i]
            reach = (depth[i] + shape.scale * 16.0) * posterior[i]
            holes.append(RoundCone(c - reach, c + reach, shape.scale * radius, shape.scale * radius))
    return Bone("sacrum", (body, arch, *facets, coccyx), tuple(holes), blend_mm=shape.scale * 3.0, cortical_mm=1.2)


def _vertebra(shape: PelvisShape, name: str, center: np.ndarray, axis: np.ndarray) -> Bone:
    """A lumbar vertebra: body, pedicles, laminae, spinous, transverse and articular processes."""
    s, w = shape.scale, shape.scale * shape.width
    x = np.array([1.0, 0.0, 0.0])
    forward = np.cross(axis, x)  # anterior, perpendicular to the axis
    forward /= np.linalg.norm(forward)

    def at(lat: float, fwd: float, up: float) -> np.ndarray:
        return center + w * lat * x + s * fwd * forward + s * up * axis

    n = int(np.ceil(2 * s * VERTEBRA_HALF_HEIGHT / SAMPLE_MM)) + 1
    line = np.linspace(at(0, 0, -VERTEBRA_HALF_HEIGHT), at(0, 0, VERTEBRA_HALF_HEIGHT), n)
    ones = np.ones(n)
    body = Sweep(line, np.tile(axis, (n, 1)), np.tile(x, (n, 1)), 25.0 * w * ones, 17.0 * s * ones, 15.0 * s * ones)
    parts: list[Primitive] = [body]
    for side in (-1.0, 1.0):
        parts += [
            RoundCone(at(side * 13, -14, 2), at(side * 15, -30, 2), s * 5.0, s * 5.0),  # pedicle
            RoundCone(at(side * 15, -32, 0), at(0, -42, -2), s * 4.5, s * 4.5),  # lamina
            RoundCone(at(side * 14, -28, 4), at(side * 44, -30, 8), s * 6.0, s * 5.0),  # transverse process
            RoundCone(at(side * 15, -34, -2), at(side * 16, -36, -14), s * 5.0, s * 4.5),  # inferior articular
            RoundCone(at(side * 17, -32, 4), at(side * 19, -30, 16), s * 5.0, s * 4.5),  # superior articular
        ]
    parts.append(RoundCone(at(0, -42, -2), at(0, -68, -10), s * 5.5, s * 4.5))  # spinous process
    return Bone(name, tuple(parts), (), blend_mm=s * 2.5, cortical_mm=1.0)


def _lumbar(shape: PelvisShape) -> tuple[Bone, Bone]:
    s1_top = _midline_point(shape, SACRUM_LINE[0])
    s1_axis = _midline_point(shape, SACRUM_LINE[0] - SACRUM_LINE[1])
    s1_axis /= np.linalg.norm(s1_axis)
    gap, half = shape.scale * DISC_HEIGHT, shape.scale * VERTEBRA_HALF_HEIGHT
    l5 = s1_top + gap * s1_axis + half * L5_AXIS
    l4 = l5 + half * L5_AXIS + gap * (L5_AXIS + L4_AXIS) / np.linalg.norm(L5_AXIS + L4_AXIS) + half * L4_AXIS
    return _vertebra(shape, "L5", l5, L5_AXIS), _vertebra(shape, "L4", l4, L4_AXIS)


def build_anatomy(shape: PelvisShape) -> Anatomy:
    """The skeleton of one subject, deterministic in ``shape``."""
    foramina = (_foramen(shape, Side.LEFT), _foramen(shape, Side.RIGHT))
    spines = (_spine(shape, Side.LEFT), _spine(shape, Side.RIGHT))
    symphysis = _symphysis(shape)
    l5, l4 = _lumbar(shape)
    bones = (
        _hip_bone(shape, Side.LEFT, foramina[0], spines[0], symphysis),
        _hip_bone(shape, Side.RIGHT, foramina[1], spines[1], symphysis),
        _sacrum(shape),
        l5,
        l4,
        _femur(shape, Side.LEFT),
        _femur(shape, Side.RIGHT),
    )
    placement = np.eye(4)
    placement[:3, :3] = _rotation(shape.tilt_deg)
    # The skeleton's origin lies about 25 mm anterior of the body's axis.
    placement[:3, 3] = SCANNER_OFFSET_RAS + np.asarray(shape.shift_mm) + np.array([0.0, 25.0 * shape.scale, 0.0])
    # In view: both hip bones, the sacrum, L5 and the lesser trochanters.
    boxes = [b.bounds() for b in bones[:4]] + [lesser_trochanter(shape, s).bounds() for s in Side]
    lo, hi = np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)
    return Anatomy(bones, foramina, spines, symphysis, placement, lo, hi)

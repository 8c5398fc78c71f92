"""Named pelvic landmark sets.

Suffixes ``-l`` and ``-r`` are the patient's left and right. In an AP
radiograph shown in the radiological convention, the patient's left is on the
image's right.

Definitions (Grupp et al. 2020, the DeepFluoro annotations):

FH
    Centre of the femoral head.
GSN
    Greater sciatic notch, on the posterior border of the ilium.
IOF
    Inferior obturator foramen: the lowest point of the obturator foramen.
MOF
    Medial obturator foramen: the most medial point of the obturator foramen.
SPS
    Superior pubic symphysis: the upper end of the symphysis. DeepFluoro marks
    it on each pubic bone (``SPS-l``, ``SPS-r``); the paper's set uses one
    midline point.
IPS
    Inferior pubic symphysis: the lower end of the symphysis, sided or midline
    as for SPS.
ASIS
    Anterior superior iliac spine: the anterior tip of the iliac crest.
"""

from __future__ import annotations

PAPER_LANDMARKS: tuple[str, ...] = ("ASIS-l", "IOF-l", "MOF-l", "SPS", "IPS", "MOF-r", "IOF-r", "ASIS-r")
"""The paper's eight landmarks L1-L8, in its order: from the patient's left to the right."""

DEEPFLUORO_LANDMARKS: tuple[str, ...] = (
    "FH-l", "FH-r", "GSN-l", "GSN-r", "IOF-l", "IOF-r", "MOF-l", "MOF-r",
    "SPS-l", "SPS-r", "IPS-l", "IPS-r", "ASIS-l", "ASIS-r",
)  # fmt: skip
"""The fourteen DeepFluoro landmarks, in the dataset's order."""


# ---------------------------------------------------------------- bone classes

SEED003_CLASSES: tuple[str, ...] = (
    "hemipelvis-l", "hemipelvis-r", "femur-l", "femur-r", "vertebrae", "upper-sacrum",
)  # fmt: skip
"""The six bone classes of seed 003 (Hresko & Drotar): left and right hemipelvis, left and right femur,
vertebrae and upper sacrum. A label map stores class ``k`` of a cohort's ``[dataset] classes`` as the
value ``k + 1``; 0 is background."""

LANDMARK_BONES: dict[str, tuple[str, ...]] = {
    "ASIS-l": ("hemipelvis-l",),
    "ASIS-r": ("hemipelvis-r",),
    "IOF-l": ("hemipelvis-l",),
    "IOF-r": ("hemipelvis-r",),
    "MOF-l": ("hemipelvis-l",),
    "MOF-r": ("hemipelvis-r",),
    "GSN-l": ("hemipelvis-l",),
    "GSN-r": ("hemipelvis-r",),
    "SPS-l": ("hemipelvis-l",),
    "SPS-r": ("hemipelvis-r",),
    "IPS-l": ("hemipelvis-l",),
    "IPS-r": ("hemipelvis-r",),
    # The midline points lie on the joint between the two pubic bones: either side is the bone.
    "SPS": ("hemipelvis-l", "hemipelvis-r"),
    "IPS": ("hemipelvis-l", "hemipelvis-r"),
    # The femoral head sits in the acetabulum: in projection it overlaps its hemipelvis.
    "FH-l": ("femur-l", "hemipelvis-l"),
    "FH-r": ("femur-r", "hemipelvis-r"),
}
"""The bone (or bones) each landmark lies on, by class name: the anatomical-consistency check of seed 003
asks whether a predicted landmark falls inside one of them."""


def landmark_bone_matrix(landmarks: tuple[str, ...] | list[str], classes: tuple[str, ...] | list[str]) -> list[list[bool]]:
    """(L, C + 1) rows: ``[l][k]`` is True when label value ``k`` (class ``classes[k - 1]``) is a bone of landmark ``l``.

    Names are matched case-insensitively. A landmark without a known bone, or whose bones the cohort
    does not label, gets a row that is True for every bone class (any bone counts), so the check
    never calls it misplaced for want of a label.
    """
    folded = [c.casefold() for c in classes]
    bones = {name.casefold(): tuple(b.casefold() for b in values) for name, values in LANDMARK_BONES.items()}
    rows = []
    for name in landmarks:
        wanted = [k + 1 for k, c in enumerate(folded) if c in bones.get(name.casefold(), ())]
        row = [False] * (len(classes) + 1)
        for k in wanted or range(1, len(classes) + 1):
            row[k] = True
        rows.append(row)
    return rows


# ---------------------------------------------------------------- mirror images

SIDE_SUFFIXES: tuple[str, str] = ("-l", "-r")
"""The suffixes of the patient's left and right (matched case-insensitively)."""


def mirror_order(names: tuple[str, ...] | list[str]) -> tuple[int, ...] | None:
    """Index of each name's mirror image: ``order[k]`` is ``names.index(partner of names[k])``.

    In a left-right mirrored image (a mirrored pelvis, seen from the mirrored pose) the patient's left
    landmark sits where the right one would. ``X-l`` pairs with ``X-r``; a name without a side
    suffix is taken to lie on the midline and maps to itself (``SPS``, ``IPS``). Used by the flip
    test (:func:`pelmark.train.model.flip_test`) for landmarks and for bone classes alike.

    Returns:
        The order, or None when no name has a side (nothing tells a lateral landmark from a midline
        one, so the set cannot be mirrored safely).

    Raises:
        PelmarkError: a sided name has no partner, or a name appears twice.
    """
    from pelmark.errors import PelmarkError

    folded = [name.casefold() for name in names]
    if len(set(folded)) != len(folded):
        raise PelmarkError(f"names repeat (case-insensitively), so they cannot be mirrored: {list(names)}")
    left, right = SIDE_SUFFIXES
    swap = {left: right, right: left}
    order, sided = [], False
    for name in folded:
        suffix = name[-len(left) :]
        if suffix not in swap:
            order.append(folded.index(name))
            continue
        sided = True
        partner = name[: -len(suffix)] + swap[suffix]
        if partner not in folded:
            raise PelmarkError(f"'{names[folded.index(name)]}' has no mirror partner '{partner}' in {list(names)}")
        order.append(folded.index(partner))
    return tuple(order) if sided else None

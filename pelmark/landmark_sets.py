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

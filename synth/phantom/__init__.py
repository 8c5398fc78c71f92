"""Procedural pelvis phantoms: CTs in HU with exactly known landmarks.

``shape`` draws a subject's parameters, ``anatomy`` builds its skeleton from
signed-distance primitives (``sdf``, ``curves``), ``landmarks`` reads the eight
landmarks off that geometry, ``voxelise`` turns it into a CT, ``cohort`` writes
a cohort with its manifest (``pelmark phantom``), and ``preview`` draws AP DRRs.
"""

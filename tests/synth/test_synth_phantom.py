"""End to end on the phantom cohort: synth's landmarks_2d sit on beads placed at the 3D landmarks."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from cohort_fixtures import centroid_errors
from pelmark.geometry import Camera
from pelmark.io.ct import load_ct
from pelmark.synth.phantom.cohort import CohortSettings, write_cohort
from pelmark.synth.pipeline import run_synth
from pelmark.synth.render import DRRRenderer
from pelmark.synth.settings import resolve_settings


def test_landmarks_2d_sit_on_the_beads_of_a_bead_marked_phantom(tmp_path):
    synth = {"views": 6, "height": 128, "pixel_spacing": 2.4, "novel_views": 1, "threads": 2}
    common = dict(n_subjects=2, seed=3, spacing_mm=4.0, preview=False, synth=synth)
    beads = write_cohort(tmp_path / "beads", CohortSettings(beads=True, bead_radius_vox=1.0, **common))
    plain = write_cohort(tmp_path / "plain", CohortSettings(beads=False, **common))
    store = tmp_path / "beads.zarr"
    run_synth(beads, store, {"scheduler": "sync"}, progress=False)

    group = zarr.open_group(str(store), mode="r")
    camera = Camera.from_dict(group.attrs["intrinsics"])
    settings = resolve_settings(synth, {})
    errors = []
    for s, subject in enumerate(group.attrs["subjects"]):
        rows = slice(s * 6, (s + 1) * 6)
        # Rendering is linear in attenuation, so subtracting the same CT without beads leaves the beads alone.
        ct = load_ct(plain.parent / "ct" / f"{subject['id']}.nii.gz")
        background = DRRRenderer(ct, camera, settings.render).render(torch.from_numpy(group["pose"][rows])).numpy()
        beads_only = group["images"][rows].astype(np.float32) - background
        for view in range(6):
            points = group["landmarks_2d"][rows][view][group["visible"][rows][view]]
            errors += centroid_errors(beads_only[view], points, window=2)
    assert len(errors) >= 30
    assert np.median(errors) < 0.15 and max(errors) < 0.35, (np.median(errors), max(errors))

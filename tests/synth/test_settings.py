"""The synth settings that enter a store's fingerprint: every render setting that changes the images, and no other."""

from __future__ import annotations

from pelmark.synth.render import RendererKind, Sampling
from pelmark.synth.settings import SynthSettings


def test_the_sampling_and_antialiasing_of_trilinear_images_are_in_the_fingerprint():
    render = SynthSettings().data_fields()["render"]
    assert render["renderer"] == "trilinear" and render["sampling"] == "slices" and render["antialias"] is True
    assert SynthSettings(n_points=300).render.sampling == Sampling.UNIFORM
    assert SynthSettings(n_points=300).data_fields()["render"]["sampling"] == "uniform"


def test_a_siddon_store_keeps_the_fingerprint_it_had_before_sampling_and_antialias_existed():
    render = SynthSettings(renderer=RendererKind.SIDDON).data_fields()["render"]
    # The render settings of a Siddon store written before those two settings were added.
    assert render == {
        "renderer": "siddon",
        "step_voxels": 2.0,
        "max_step_mm": 2.0,
        "n_points": None,
        "bone_hu": 350.0,
        "bone_multiplier": 1.0,
        "crop_to_body": True,
        "air_threshold": 0.1,
    }


def test_runtime_settings_stay_out_of_the_fingerprint():
    fast = SynthSettings(compile=True, threads=2, batch_size=32, device="cpu")
    assert fast.data_fields() == SynthSettings().data_fields()


def test_a_nanodrr_store_fingerprints_what_nanodrr_reads():
    render = SynthSettings(renderer=RendererKind.NANODRR).data_fields()["render"]
    assert render["renderer"] == "nanodrr" and render["antialias"] is True and render["n_points"] is None
    assert "sampling" not in render and "step_voxels" not in render  # nanodrr reads neither
    assert SynthSettings(renderer=RendererKind.NANODRR, n_points=300).data_fields()["render"]["n_points"] == 300

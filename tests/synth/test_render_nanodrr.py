"""The nanodrr renderer: its Triton kernel, rays past the detector, its sample count, and the error without it.

Where beads land is proven in test_render_beads.py and the values against Siddon in
test_render.py, both through nanodrr's pure-torch kernel. Here Triton's interpreter
runs the fused kernel that renders on a GPU, on the CPU, with the inputs pelmark gives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pelmark import geometry as g
from pelmark.errors import PelmarkError
from pelmark.io.ct import CTVolume
from pelmark.synth.render import DRRRenderer, RendererKind, RenderSettings

NANODRR = RenderSettings(renderer=RendererKind.NANODRR)


def test_choosing_nanodrr_without_it_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanodrr", None)  # `import nanodrr` now raises ImportError
    ct = CTVolume(hu=np.zeros((4, 4, 4), dtype=np.float32), affine_ras=np.eye(4))
    with pytest.raises(PelmarkError, match=r"pip install 'pelmark\[gpu\]'") as error:
        DRRRenderer(ct, g.Camera.centered(8, spacing_mm=1.0), NANODRR)
    assert "\n" not in str(error.value)


def test_samples_per_ray_keep_the_step_within_both_limits():
    from pelmark.synth.nanodrr_backend import samples_per_ray

    # Support of 11 x 21 x 31 voxels of 2 mm: diagonal 39.05 voxels, 78.1 mm.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    assert samples_per_ray((10, 20, 30), affine, max_step_mm=100.0) == 40  # ceil(39.05 / 1)
    assert samples_per_ray((10, 20, 30), affine, max_step_mm=100.0, step_voxels=2.0) == 20  # ceil(39.05 / 2)
    assert samples_per_ray((10, 20, 30), affine, max_step_mm=1.5) == 53  # ceil(78.1 / 1.5)


def test_rays_run_on_past_the_detector():
    """A body reaching through the detector (170 mm behind the isocentre) is integrated whole, as by Siddon."""
    pytest.importorskip("nanodrr")
    hu = np.full((9, 81, 9), -1000.0, dtype=np.float32)  # 5 mm along y, index j at y = 5 (40 - j): +200 to -200 mm
    hu[2:7, 21:77, 2:7] = 0.0  # water from y = +95 mm to -180 mm (past the detector): 56 voxels, 280 mm
    ct = CTVolume(hu=hu, affine_ras=np.diag([5.0, -5.0, 5.0, 1.0]))
    camera = g.Camera.centered(9, spacing_mm=1.0)
    pose = torch.zeros(1, 6, dtype=torch.float64)
    image = DRRRenderer(ct, camera, NANODRR).render(pose)[0]
    reference = DRRRenderer(ct, camera, RenderSettings(renderer=RendererKind.SIDDON)).render(pose)[0]
    assert float(image[4, 4]) == pytest.approx(280.0, rel=0.01)
    assert float(image[4, 4]) == pytest.approx(float(reference[4, 4]), rel=0.005)


_TRITON_ON_CPU = textwrap.dedent(
    """
    import numpy as np, torch
    import nanodrr.drr.backends
    nanodrr.drr.backends.DEVICE_BACKENDS["cpu"] = "triton"  # let nanodrr run its kernel on CPU tensors
    from pelmark import geometry as g
    from pelmark.io.ct import CTVolume
    from pelmark.synth.nanodrr_backend import NanoDRRBackend
    from pelmark.synth.render import DRRRenderer, RendererKind, RenderSettings

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000.0, 1500.0, size=(14, 12, 10)).astype(np.float32)
    affine = np.array([[0.0, -6.0, 0.0, 10.0], [7.0, 0.0, 0.0, -20.0], [0.0, 0.0, 8.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
    camera = g.Camera(height=10, width=9, sdd_mm=1020.0, sid_mm=700.0, spacing_x_mm=12.0, spacing_y_mm=10.0,
                      cx_px=4.7, cy_px=5.2)
    pose = torch.tensor([[0.3, -0.2, 0.5, 20.0, -300.0, 10.0]], dtype=torch.float64)  # through the detector (320 mm posterior)
    settings = RenderSettings(renderer=RendererKind.NANODRR, n_points=12)
    renderer = DRRRenderer(CTVolume(hu=hu, affine_ras=affine), camera, settings)
    torch_path = renderer._nanodrr
    assert torch_path.kernel == "torch" and torch_path.far_depth_mm(pose) > camera.sdd_mm
    fused = NanoDRRBackend(renderer.drr.density, torch_path._affine_world, camera, 12, kernel="triton")
    expected, out = torch_path.render(pose), fused.render(pose)
    assert float(expected.abs().max()) > 10.0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    print("ok")
    """
)


@pytest.mark.slow
def test_the_triton_kernel_renders_what_the_torch_kernel_does():
    """The fused kernel (the GPU path), run by Triton's interpreter, on pelmark's inputs: a permuted affine, an
    off-centre anisotropic detector, a pose that pushes the volume past the detector. In a fresh process,
    because the interpreter is chosen when Triton first compiles the kernel."""
    pytest.importorskip("nanodrr")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_ON_CPU], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

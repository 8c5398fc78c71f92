"""Joseph's slice sampling on its own: exact values by hand, and rays that do not share a source."""

from __future__ import annotations

import torch

from pelmark.synth.render import ray_box_interval
from pelmark.synth.slices import SliceSampler


def _integrate(volume: torch.Tensor, source: torch.Tensor, target: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    dims = torch.tensor(volume.shape, dtype=torch.float64)
    entry, exit_ = ray_box_interval(source, target, torch.full_like(dims, -1.0), dims)
    length_mm = (target - source).norm(dim=-1).float()  # 1 mm voxels
    return SliceSampler(volume).integrate(source, target, length_mm, entry, exit_, chunk)


def test_rays_along_each_axis_integrate_a_block_exactly():
    # A block of 4 x 6 x 8 voxels of value 2 inside zeros. A ray along an axis through the block's
    # middle crosses 4, 6 or 8 slices of value 2, 1 mm apart: 8, 12 or 16 (the trilinear
    # ramps beyond the outer slices are exactly what the one-voxel slice spacing accounts for).
    volume = torch.zeros(10, 12, 14)
    volume[3:7, 3:9, 3:11] = 2.0
    middle = torch.tensor([4.5, 5.5, 6.5], dtype=torch.float64)  # between voxel centres: bilinear in-plane
    source, target = [], []
    for axis in range(3):
        for sign in (1.0, -1.0):
            offset = torch.zeros(3, dtype=torch.float64)
            offset[axis] = 40.0 * sign
            source.append(middle - offset)
            target.append(middle + offset)
    values = _integrate(volume, torch.stack(source), torch.stack(target))
    torch.testing.assert_close(values, torch.tensor([8.0, 8.0, 12.0, 12.0, 16.0, 16.0]))


def test_rays_from_different_sources_in_one_call():
    """A ray whose source lies inside the volume, sampled with a ray that starts outside, sees nothing behind its source.

    The two share slices along j; the group's slices start at the outside ray's entry,
    so the inside ray's samples there (its line behind its source) must be left out.
    """
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(20, 20, 20, generator=generator) + 0.5
    source = torch.tensor([[10.0, -30.0, 10.0], [9.3, 12.4, 10.6]], dtype=torch.float64)
    target = torch.tensor([[10.5, 50.0, 9.0], [11.0, 40.0, 9.0]], dtype=torch.float64)
    together = _integrate(volume, source, target)
    alone = torch.cat([_integrate(volume, source[i : i + 1], target[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone)
    # The inside ray crosses slices j = 13 to 19 (7 of them, each 1 mm along j) of values 0.5 to 1.5.
    assert 7 * 0.5 < float(alone[1]) < 7 * 1.5 * (target[1] - source[1]).norm() / (target[1, 1] - source[1, 1])


def test_chunks_of_any_size_give_the_same_values():
    generator = torch.Generator().manual_seed(1)
    volume = torch.rand(16, 18, 12, generator=generator)
    source = torch.tensor([[8.0, -60.0, 6.0]], dtype=torch.float64).expand(50, 3)
    target = torch.cat(
        [torch.rand(50, 1, generator=generator, dtype=torch.float64) * 30 - 7, torch.full((50, 1), 60.0, dtype=torch.float64),
         torch.rand(50, 1, generator=generator, dtype=torch.float64) * 24 - 6], dim=1
    )
    whole = _integrate(volume, source, target)
    assert bool((whole > 0).any())
    torch.testing.assert_close(_integrate(volume, source, target, chunk=40), whole, rtol=1e-6, atol=1e-6)

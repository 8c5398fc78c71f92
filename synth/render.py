"""DRR rendering with DiffDRR 0.6.1, in pelmark's geometry.

pelmark builds DiffDRR's torchio subject itself instead of calling
``diffdrr.data.read``, for two reasons: ``read`` rescales HU by the volume's own
minimum and maximum (so one metal voxel changes every image's contrast), and it
fails on a volume without soft-tissue voxels. Here the renderer integrates the
linear attenuation relative to water, ``mu = max(0, 1 + HU / 1000)``, with bone
optionally weighted, so a line integral is in water-equivalent millimetres.
"""

from __future__ import annotations

import dataclasses
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from pelmark import geometry
from pelmark.geometry import Camera
from pelmark.io.ct import CTVolume


class RendererKind(str, Enum):
    SIDDON = "siddon"
    TRILINEAR = "trilinear"


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How DRRs are computed.

    Attributes:
        renderer: DiffDRR backend; trilinear is fast, Siddon is the exact reference.
        n_points: samples per ray for the trilinear renderer.
        bone_hu: HU above which a voxel counts as bone.
        bone_multiplier: extra weight on bone attenuation (1 = physical).
        patch_size: render the detector in square patches of this many pixels to bound memory.
    """

    renderer: RendererKind = RendererKind.TRILINEAR
    n_points: int = 250
    bone_hu: float = 350.0
    bone_multiplier: float = 1.0
    patch_size: int | None = None


def hu_to_attenuation(hu: np.ndarray, settings: RenderSettings) -> np.ndarray:
    """Linear attenuation relative to water, float32, never negative."""
    mu = np.clip(1.0 + hu.astype(np.float32) / 1000.0, 0.0, None)
    if settings.bone_multiplier != 1.0:
        mu = np.where(hu > settings.bone_hu, mu * settings.bone_multiplier, mu)
    return mu.astype(np.float32)


def make_subject(ct: CTVolume, settings: RenderSettings):
    """The torchio subject DiffDRR expects, in pelmark's world frame (centred RAS)."""
    from torchio import ScalarImage, Subject

    affine = ct.affine_world
    density = torch.from_numpy(hu_to_attenuation(ct.hu, settings))[None]
    reorient = torch.eye(4)
    reorient[:3, :3] = geometry._DIFFDRR_AP_REORIENT.float()
    return Subject(
        volume=ScalarImage(tensor=torch.from_numpy(ct.hu)[None], affine=affine),
        density=ScalarImage(tensor=density, affine=affine),
        mask=None,
        orientation="AP",
        reorient=reorient,
        fiducials=None,
    )


class DRRRenderer:
    """Renders DRRs of one CT for batches of poses θ.

    Args:
        ct: the volume.
        camera: detector and nominal C-arm.
        settings: renderer choice and attenuation model.
        device: torch device to render on.
    """

    def __init__(self, ct: CTVolume, camera: Camera, settings: RenderSettings, device: str | torch.device = "cpu"):
        from diffdrr.drr import DRR

        self.camera = camera
        self.settings = settings
        self.device = torch.device(device)
        kwargs = {}
        if settings.renderer == RendererKind.TRILINEAR:
            self._call_kwargs = {"n_points": settings.n_points}
        else:
            self._call_kwargs = {}
        self.drr = DRR(
            make_subject(ct, settings),
            **geometry.diffdrr_detector_kwargs(camera),
            renderer=RendererKind(settings.renderer).value,
            patch_size=settings.patch_size,
            **kwargs,
        ).to(self.device)

    @torch.no_grad()
    def render(self, poses: Tensor | np.ndarray) -> Tensor:
        """(B, H, W) float32 line integrals (water-equivalent mm) for poses θ (B, 6)."""
        poses = torch.as_tensor(poses, dtype=torch.float64)
        rigid = geometry.to_diffdrr(poses, self.camera).to(self.device)
        return self.drr(rigid, **self._call_kwargs)[:, 0].float()

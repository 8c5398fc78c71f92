"""One rule for the ``--device`` option of every stage."""

from __future__ import annotations

import torch

from pelmark.errors import PelmarkError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; a bare ``cuda`` is this process's GPU (``cuda:local_rank``).

    Raises:
        PelmarkError: CUDA asked for but not available, or a name torch does not know.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PelmarkError(f"device '{name}' asked for, but CUDA is not available")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise PelmarkError(f"unknown device '{name}' (auto, cpu, cuda or cuda:N)") from None

"""Seeds derived from one root seed and a path of names, stable across processes.

Python's ``hash()`` of a str changes with every interpreter (PYTHONHASHSEED),
so it cannot make a dataset reproducible; sha256 of a canonical encoding can.
A worker seeds its generator from, say, ``(root_seed, "synth", subject_id,
view_index)``, so the same seed gives the same data whatever the number of
workers or the order they run in.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# 63 bits: fits a signed int64, which torch.Generator.manual_seed and most APIs accept.
_SEED_BITS = 63


def _encode(part: int | str) -> bytes:
    """Tag each part with its type and length, so ("1", 2) and (1, "2") or ("a,b",) and ("a", "b") differ."""
    if isinstance(part, bool) or not isinstance(part, (numbers.Integral, str)):
        raise TypeError(f"seed parts must be int or str, got {type(part).__name__}: {part!r}")
    if isinstance(part, str):
        tag, body = b"s", part.encode("utf-8")
    else:
        tag, body = b"i", str(int(part)).encode("ascii")
    return tag + len(body).to_bytes(8, "big") + body


def derive_seed(*parts: int | str) -> int:
    """A non-negative 63-bit seed determined by ``parts`` alone."""
    digest = hashlib.sha256(b"".join(_encode(p) for p in parts)).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def numpy_generator(*parts: int | str) -> np.random.Generator:
    """A numpy Generator seeded with :func:`derive_seed` of ``parts``."""
    return np.random.default_rng(derive_seed(*parts))


def torch_generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator

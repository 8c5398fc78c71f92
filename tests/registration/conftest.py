"""Registration tests work on tensors of a few hundred numbers: run them on one thread.

Intra-op threads only add synchronisation to ops this small, and on a shared
machine a parallel region can wait milliseconds for a busy core.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

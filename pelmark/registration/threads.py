"""One intra-op thread for the registration's small CPU kernels.

A registration batch is small: 32 samples of 8 landmarks give tensors of a few
hundred numbers, and one LM solve with its backward runs about a thousand of
them. Elementwise kernels that small already run on the calling thread, but
CPU matrix products and factorisations (mm, bmm, Cholesky, LU) open an OpenMP
parallel region on every call whatever their size, and a region waits for all
its threads. On a busy machine each such kernel of microseconds can then wait
milliseconds for a core (README, "Performance": the LM layer's forward and
backward on the shared 2-core machine under load).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Above this many landmarks in a batch (samples x landmarks) the kernels are big enough to share.
MAX_SINGLE_THREAD_LANDMARKS = 1 << 14


@contextlib.contextmanager
def small_problem_threads(device: torch.device, landmarks: int) -> Iterator[None]:
    """Run the block on one intra-op thread when it works on a small CPU batch.

    Args:
        device: where the batch lives (CUDA batches are left alone).
        landmarks: samples x landmarks of the batch.

    The setting is restored on exit. With the OpenMP backend it applies to the
    calling thread only; MKL's setting is process-wide for the block's duration.
    """
    threads = torch.get_num_threads()
    # device.type builds a string on every call: asked last.
    if threads == 1 or landmarks > MAX_SINGLE_THREAD_LANDMARKS or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

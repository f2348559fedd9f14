"""CPU threads for a block of work.

Small tensor operations (learned exit policies, batch-size-1 inference, a 6-layer model's
fine-tuning steps) gain little from intra-op parallelism, and on a shared CPU the extra threads
only wait for each other: one thread is often much faster there, and its timings are steadier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None`` or 0: leave torch's setting)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

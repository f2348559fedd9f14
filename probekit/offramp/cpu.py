"""CPU threads for small work.

Tiny tensor operations (the learned exit policies' training, batch-size-1 inference) gain
nothing from intra-op parallelism, and on a shared CPU the extra threads only wait for each
other: these run single-threaded, which also makes their timings steadier.
"""

from __future__ import annotations

import torch


class threads:
    """Run a block with ``n`` CPU threads (``None``: leave torch's setting)."""

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)

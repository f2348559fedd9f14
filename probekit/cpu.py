"""CPU threads for a block of work, and a heap that does not grow with a long job.

Small tensor operations (learned exit policies, batch-size-1 inference, a 6-layer model's
fine-tuning steps) gain little from intra-op parallelism, and on a shared CPU the extra threads
only wait for each other: one thread is often much faster there, and its timings are steadier.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from typing import Any

import torch
from threadpoolctl import threadpool_limits


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread: torch's and the BLAS library's behind NumPy.

    For a long run of tiny operations (the ``senteval`` protocol's mini-batch steps: products of
    64 rows, a few thousand logits) threads cost more than they share. Two thread pools that spin
    while waiting (torch's OpenMP and OpenBLAS's own) slow each other down most: on the 2-core CPU
    here the protocol took 51.6 s for one task with both at their defaults and 2.9 s on one thread."""
    with cpu_threads(1), threadpool_limits(1, user_api="blas"):
        yield


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (``malloc.h``)."""
HEAP_MMAP_THRESHOLD = 1 << 20
"""Allocations at least this large get their own memory map, returned to the system when freed."""


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (``malloc_trim``, ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@functools.cache
def bound_heap() -> bool:
    """Keep a long extraction's heap from growing with the number of batches (once per process).

    Every batch allocates activations of another padded length; glibc raises its memory-map threshold
    after the first large buffers are freed, so later ones come from the heap, which fragments and is
    never given back: peak RSS grew with the number of texts (1085 MiB at 6k lines, 1259 at 24k). A fixed
    threshold (:data:`HEAP_MMAP_THRESHOLD`) maps those buffers on their own and returns them on free.
    Returns whether it applied (glibc only; elsewhere a no-op)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_MMAP_THRESHOLD)
    )


def trim_heap() -> bool:
    """Give the heap's free memory back to the system (glibc's ``malloc_trim``); whether any was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False

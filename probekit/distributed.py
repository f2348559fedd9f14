"""Running under ``torchrun`` or ``accelerate launch``: who am I, and which work is mine.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous
variables), so one code path serves one process, several GPUs on a machine and several
machines. Work is split into whole batches of the global, deterministic batch plan, so
every batch is computed exactly as in a single-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size from the launcher's environment (a single process by default)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def rank_device(device: str, info: DistInfo) -> str:
    """Each rank uses its own GPU (``cuda:LOCAL_RANK``) when GPUs are used."""
    if info.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return device


def init_process_group(info: DistInfo, device: torch.device) -> bool:
    """Join the launcher's process group (NCCL on GPU, Gloo on CPU); True if this call created it."""
    if not info.distributed or (tdist.is_available() and tdist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return True


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def destroy_process_group() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def balance(costs: list[float], world_size: int) -> list[list[int]]:
    """Split items over ranks, longest-processing-time first: each item (largest first) goes to
    the rank with the least work so far. Deterministic: ties go to the lower rank, and each
    rank's item indices come back in ascending order."""
    load = np.zeros(world_size)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = int(np.argmin(load))
        load[r] += costs[i]
        shares[r].append(i)
    return [sorted(s) for s in shares]


def assign_batches(costs: list[tuple[str, int, float]], world_size: int) -> list[list[tuple[str, int]]]:
    """Balance ``(split, batch, cost)`` items of a batch plan over ranks (see :func:`balance`),
    so no rank is left holding all the long sentences; each share comes back in plan order."""
    return [[costs[i][:2] for i in share] for share in balance([c[2] for c in costs], world_size)]

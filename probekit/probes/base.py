"""What a probe kind is, and the registry of kinds (``linear``, ``mlp``, ...).

A kind trains one classifier per (layer, label set, regularisation value) on shared
inputs, all at once, and predicts with every one of them. Everything around it (label
mapping, the shuffled-label control, selection on dev, baselines, intervals) is
:class:`~probekit.probes.layerwise.LayerwiseProbe`'s job, so a new kind is one class
registered here with :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from probekit.errors import ProbekitError

KINDS: dict[str, type[ProbeKind]] = {}


def register(cls: type[ProbeKind]) -> type[ProbeKind]:
    """Class decorator: make a kind available as ``LayerwiseProbe(kind=cls.name)``."""
    KINDS[cls.name] = cls
    return cls


def get_kind(name: str) -> type[ProbeKind]:
    if name not in KINDS:
        raise ProbekitError(f"unknown probe {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


class ProbeKind(ABC):
    """Batched training of one probe family over layers x label sets x a regularisation grid.

    ``fit`` gets the train features ``X`` [L, N, D] (a float tensor of the layers to fit; a
    strided view is fine), the label sets ``Y`` [S, N] (class ids 0..n_classes-1; set 0 the
    true labels, set 1 the shuffled control) and the dev split ``(X_dev [L, M, D], y_dev)``
    (for kinds that stop early on it, as SentEval's MLP does). ``predict`` takes [L, M, D] and
    returns class ids [L, S, G, M]: one prediction per layer, label set and grid value.
    """

    name: ClassVar[str]
    reg_name: ClassVar[str]
    """What the grid values are (``C``: inverse L2 strength, ``weight_decay``: L2 strength)."""
    default_grid: ClassVar[tuple[float, ...]]
    step_name: ClassVar[str]
    """What one step of training is called in the progress bar (``iter``, ``epoch``)."""
    limit_option: ClassVar[str]
    """The option that raises the iteration limit (named in the warning when a fit reaches it)."""

    def __init__(self, grid: Sequence[float] | None = None, seed: int = 0, **options: Any) -> None:
        self.grid = tuple(float(v) for v in (grid if grid is not None else self.default_grid))
        if not self.grid or any(not v > 0 for v in self.grid):
            raise ProbekitError(f"the {self.reg_name} grid must be positive numbers, got {list(self.grid)}")
        self.seed = seed
        self.n_iter_: torch.Tensor | None = None
        """Iterations (linear) or epochs (mlp) each problem ran, [L, S, G]."""
        self.not_converged_: int = 0
        """How many problems stopped at the iteration (epoch) limit before converging (stopping early)."""

    @abstractmethod
    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> ProbeKind: ...

    @abstractmethod
    def predict(self, X: torch.Tensor) -> torch.Tensor: ...

    def settings(self) -> dict[str, Any]:
        """The options that determine the results (recorded in the results table)."""
        return {"grid": list(self.grid), "reg_name": self.reg_name}

"""What a probe kind is, and the registry of kinds (``linear``, ``mlp``, ...).

A kind trains one classifier per (layer, label set, regularisation value) on shared
inputs, all at once, and predicts with every one of them. Everything around it (label
mapping, the shuffled-label control, selection on dev, baselines, intervals) is
:class:`~probekit.probes.layerwise.LayerwiseProbe`'s job, so a new kind is one class in one
place: a ``Config`` dataclass of its options (with a ``grid`` field) and ``fit``/``predict``,
registered in :data:`PROBE_KINDS`. Its options then reach ``LayerwiseProbe(kind=...)``,
``probekit.probe(...)``, the suite files and ``probekit probe --help`` without another edit::

    @PROBE_KINDS.register("centroid")
    class CentroidProbe(ProbeKind):
        reg_name, step_name, limit_option = "shrinkage", "iter", ""

        @dataclass(frozen=True)
        class Config(KindConfig):
            component = "the centroid probe"
            grid: tuple[float, ...] = option((1.0,), "Shrinkage grid.", gt=0)

        def fit(self, X, Y, n_classes, dev=None, callback=None): ...
        def predict(self, X): ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from probekit.config import Config
from probekit.errors import ParamError
from probekit.registry import Registry

LOG_CHUNK = 1 << 24
"""At most about this many logits at once when scoring log-likelihoods."""


@dataclass(frozen=True)
class KindConfig(Config):
    """Base of a probe kind's options: every kind has a ``grid`` of positive regularisation values
    (declared by the kind, with its own default and help)."""

    def check(self) -> None:
        grid = getattr(self, "grid", None)
        if grid is not None and len(grid) == 0:
            raise ParamError("grid", "needs at least one value")


class ProbeKind(ABC):
    """Batched training of one probe family over layers x label sets x a regularisation grid.

    ``__init__`` only stores the validated options (``config``, an instance of the kind's
    ``Config``) and the ``seed``. ``fit`` gets the train features ``X`` [L, N, D] (a float
    tensor of the layers to fit; a strided view is fine), the label sets ``Y`` [S, N] (class
    ids 0..n_classes-1; set 0 the true labels, set 1 the shuffled control) and the dev split
    ``(X_dev [L, M, D], y_dev)`` (for kinds that stop early on it, as SentEval's MLP does), and
    returns ``self``. ``predict`` takes [L, M, D] and returns class ids [L, S, G, M]: one
    prediction per layer, label set and grid value.
    """

    Config: ClassVar[type[KindConfig]]
    """The kind's options (a frozen dataclass deriving from :class:`KindConfig`)."""
    reg_name: ClassVar[str]
    """What the grid values are (``C``: inverse L2 strength, ``weight_decay``: L2 strength)."""
    step_name: ClassVar[str] = "iter"
    """What one step of training is called in the progress bar (``iter``, ``epoch``)."""
    limit_option: ClassVar[str] = ""
    """The parameter that raises the iteration limit (``max_iter``), named when a fit reaches it."""
    fixed_settings: ClassVar[dict[str, Any]] = {}
    """Settings that are not options but determine the results (``solver``), recorded with them."""

    def __init__(self, config: KindConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else self.Config()
        self.seed = seed

    @property
    def grid(self) -> tuple[float, ...]:
        return tuple(self.config.grid)  # type: ignore[attr-defined]

    @property
    def name(self) -> str:
        return name_of(type(self))

    @abstractmethod
    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> ProbeKind:
        """Fit every problem; set ``n_iter_`` [L, S, G] (iterations or epochs per problem, or None) and
        ``not_converged_`` (how many problems stopped at the limit before converging)."""

    @abstractmethod
    def predict(self, X: torch.Tensor) -> torch.Tensor: ...

    def log_loss(self, X: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Summed natural-log loss [L, S, G] of every problem on ``X`` [L, M, D], label set ``s`` scored on
        ``Y[s]`` [S, M] (``keep`` [M]: which rows count); the MDL probe's codelength. Needs the kind's
        ``decision_function`` (logits [L, S, G, K, M]; K = 1 for a binary logistic model)."""
        decide = getattr(self, "decision_function", None)
        if decide is None:
            raise ParamError("block_probe", f"the {self.name} probe has no decision_function to give log-likelihoods")
        n_layers, m, _ = X.shape
        out = torch.zeros(n_layers, Y.shape[0], len(self.grid), dtype=torch.float64, device=X.device)
        step = max(1, LOG_CHUNK // max(1, n_layers * Y.shape[0] * len(self.grid) * 4))
        for r in range(0, m, step):
            nll = summed_nll(decide(X[:, r : r + step]), Y[:, r : r + step])  # [L, S, G, B]
            if keep is not None:
                nll = nll * keep[r : r + step].to(nll.dtype)
            out += nll.sum(-1, dtype=torch.float64)
        return out

    def train_metrics(self) -> dict[str, Any]:
        """Numbers per layer measured while fitting, on train (metric name -> array [layers]); the MDL
        probe's codelengths. Most kinds have none."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The options that determine the results (recorded in the results table, fingerprinted)."""
        return {**self.config.to_dict(), "reg_name": self.reg_name, **self.fixed_settings}


def summed_nll(z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Per-row natural-log loss [L, S, G, M] of logits ``z`` [L, S, G, K, M] (K = 1: the logistic loss of one
    logit) for labels ``Y`` [S, M] (ids; negative ids, labels unseen in train, are scored as class 0 and
    should be masked by the caller)."""
    n_layers, s, g, k, m = z.shape
    y = Y.clamp(min=0)[None, :, None, :].expand(n_layers, s, g, m)
    if k == 1:
        return F.softplus(z[:, :, :, 0]) - y.to(z.dtype) * z[:, :, :, 0]
    return torch.logsumexp(z, 3) - z.gather(3, y[:, :, :, None, :]).squeeze(3)


PROBE_KINDS: Registry[type[ProbeKind]] = Registry("probe kind", "kind")
"""Every probe kind by name; a plugin registers its own here (see the module docstring)."""


def name_of(cls: type[ProbeKind]) -> str:
    """The registered name of a kind class (its class name when it is not registered)."""
    for name, obj in PROBE_KINDS.items():
        if obj is cls:
            return name
    return cls.__name__

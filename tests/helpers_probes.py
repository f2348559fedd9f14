"""A probe kind from outside the package (a plugin, as ``$PROBEKIT_PLUGINS`` loads one): one class, one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from probekit.config import option
from probekit.probes import PROBE_KINDS, KindConfig, ProbeKind

NAME = "test-centroid"


@dataclass(frozen=True)
class CentroidConfig(KindConfig):
    component = "the test centroid probe"
    grid: tuple[float, ...] = option((0.0, 0.5), "Shrinkage of the class means towards the overall mean.", ge=0, lt=1)
    metric_power: float = option(2.0, "Power of the distance (only its order matters).", gt=0)


class CentroidProbe(ProbeKind):
    """Nearest class mean (a test plugin)."""

    Config = CentroidConfig
    reg_name = "shrinkage"

    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> CentroidProbe:
        onehot = F.one_hot(Y, n_classes).to(X.dtype)  # [S, N, K]
        means = torch.einsum("snk,lnd->lskd", onehot, X) / onehot.sum(1).clamp(min=1)[None, :, :, None]
        overall = X.mean(1)[:, None, None, None, :]  # [L, 1, 1, 1, D]
        g = torch.tensor(self.grid, dtype=X.dtype, device=X.device)[None, None, :, None, None]
        self.means_ = (1 - g) * means[:, :, None] + g * overall  # [L, S, G, K, D]
        self.n_iter_ = None
        self.not_converged_ = 0
        return self

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        diff = X[:, None, None, :, None, :] - self.means_[:, :, :, None, :, :]  # [L, S, G, M, K, D]
        return diff.pow(2).sum(-1).argmin(-1)  # [L, S, G, M]


if NAME not in PROBE_KINDS:
    PROBE_KINDS.register(NAME, CentroidProbe)

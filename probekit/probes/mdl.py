"""The MDL probe: Voita & Titov's (2020) online codelength, every layer and every block at once.

The train labels are transmitted in blocks of a fixed random order of the train rows, at
:data:`FRACTIONS` of train (0.1, 0.2, 0.4, ..., 50, 100 %): the first block with the uniform
code (``t_1 log2 K`` bits), every later block ``i+1`` with the probe trained on the blocks before
it (``sum -log2 p(y | x)`` over the block's rows; a block whose prefix lacks a class with the
uniform code too, since the probe has no optimum there: the unpenalised intercept diverges). The
online codelength is the sum, the uniform codelength ``N log2 K`` and the compression
``uniform / online`` (1: the labels are no easier to transmit with the features than without;
higher: the features make them easy to learn from few examples). The shuffled-label control gets
its own codelength beside it.

Batched: the block probes are the linear probe's problems, one label set per (block, labels) with
0/1 row weights marking the prefix (:meth:`LogisticProbe.fit`'s ``weights``), so all layers, all
blocks, the regularisation grid, the control and the ordinary full-train probe (whose accuracy is
reported as every kind's is) are one call of the batched L-BFGS, on the CPU or the GPU. Each block's
``C`` is chosen per layer as the one with the lowest log loss on ``dev`` (not part of what is
encoded, so the choice costs no bits); ``--grid 1`` fixes it. The probe trained per block is a
parameter (``block_probe``: a registered kind whose ``fit`` takes ``weights`` and that has a
``decision_function``); the linear probe is the one that does.

Deviation from the paper: Voita & Titov's probe is an MLP trained per block with early stopping;
here it is the linear probe (convex: the same objective at any batch order, so the codelength does
not depend on an optimiser's seed), and ``C`` is chosen on dev per block.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from probekit.config import option
from probekit.errors import ParamError
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind
from probekit.probes.linear import LogisticProbe

FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25.0, 50.0, 100.0)
"""Voita & Titov's block ends, in percent of train."""
ORDER_SEED = 10_007
"""The transmission order is ``torch.randperm(N)`` of a generator seeded ``ORDER_SEED + seed``."""
LOG_CHUNK = 1 << 24
"""At most this many logits at once when scoring blocks and dev."""


def block_ends(n: int, fractions: tuple[float, ...] = FRACTIONS) -> list[int]:
    """Row counts at the end of each block: ``floor(n f / 100)``, at least 1, strictly increasing, last ``n``."""
    ends: list[int] = []
    for f in fractions:
        t = max(1, min(n, int(n * f / 100)))
        if not ends or t > ends[-1]:
            ends.append(t)
    if ends[-1] != n:
        ends.append(n)
    return ends


def transmission_order(n: int, seed: int) -> torch.Tensor:
    """The fixed random order in which the train rows are transmitted."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED + int(seed)))


@dataclass(frozen=True)
class MDLConfig(KindConfig):
    """Options of the MDL probe: the block probe's (the linear probe's names) and the block fractions."""

    component: ClassVar[str] = "the MDL probe"
    grid: tuple[float, ...] = option(
        (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
        "Comma-separated C grid of the block probes (per block the lowest dev log loss; the full-train "
        "probe by dev accuracy).",
        gt=0,
    )
    max_iter: int = option(1000, "L-BFGS iteration limit.", ge=1)
    tol: float = option(1e-4, "Gradient tolerance (scikit-learn's tol).", gt=0)
    history: int = option(10, "L-BFGS memory (pairs of past steps).", ge=1)
    fractions: tuple[float, ...] = option(
        FRACTIONS, "Block ends in percent of train, increasing, the last 100 (Voita & Titov's).", gt=0, le=100
    )
    block_probe: str = option("linear", "The probe trained on each block's prefix.", choices=("linear",))

    def check(self) -> None:
        super().check()
        fr = tuple(self.fractions)
        if len(fr) < 2 or any(b <= a for a, b in itertools.pairwise(fr)) or fr[-1] != 100:
            raise ParamError("fractions", f"must be at least two increasing percentages ending at 100, got {fr}")


@PROBE_KINDS.register("mdl", aliases=("online-code",))
class MDLProbe(ProbeKind):
    """Online codelength (Voita & Titov) on every layer; accuracy from the full-train linear probe."""

    Config = MDLConfig
    reg_name = "C"
    step_name = "iter"
    limit_option = "max_iter"
    fixed_settings: ClassVar[dict[str, Any]] = {"solver": "lbfgs", "code": "online"}
    config: MDLConfig

    def _block_probe(self) -> ProbeKind:
        cfg = self.config
        cls = PROBE_KINDS.get(cfg.block_probe)
        options = {k: getattr(cfg, k) for k in cls.Config.field_names() if hasattr(cfg, k)}
        return cls(cls.Config.from_mapping(options), seed=self.seed)

    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> MDLProbe:
        n_layers, n, _ = X.shape
        s = Y.shape[0]
        device = X.device
        self.n_sets_, self.n_classes_ = s, n_classes
        self.order_ = transmission_order(n, self.seed).to(device)
        self.ends_ = block_ends(n, tuple(self.config.fractions))
        prefixes = self.ends_[:-1]  # block i+1 is encoded by the probe trained on the first ends_[i] rows
        rank = torch.empty(n, dtype=torch.long, device=device)
        rank[self.order_] = torch.arange(n, device=device)
        masks = torch.stack([(rank < t) for t in prefixes]).to(X.dtype)  # [P, N]
        p = len(prefixes)
        labels = torch.cat([Y, Y.repeat(p, 1)])  # [S + P*S, N]: full train, then (prefix, set)
        weights = torch.cat([torch.ones(s, n, dtype=X.dtype, device=device), masks.repeat_interleave(s, dim=0)])
        probe = self._block_probe()
        self.estimator_: LogisticProbe = probe  # type: ignore[assignment]
        probe.fit(X, labels, n_classes, dev=dev, callback=callback, weights=weights, order=self.order_)  # type: ignore[call-arg]
        g = len(self.grid)
        n_iter = getattr(probe, "n_iter_", None)
        self.n_iter_ = None if n_iter is None else n_iter[:, :s]
        self.not_converged_ = int(getattr(probe, "not_converged_", 0))
        # bits of each block under each (layer, set, C) of the probe trained on its prefix
        bits = torch.zeros(n_layers, p, s, g, dtype=torch.float64, device=device)
        for i, t in enumerate(prefixes):
            rows = self.order_[t : self.ends_[i + 1]]
            bits[:, i] = self._nll(X[:, rows], Y[:, rows], S=s, index=i) / math.log(2)
        if dev is not None and g > 1:
            xd, yd = dev
            dev_loss = torch.stack(
                [self._nll(xd, yd[None].expand(s, -1).clamp(min=0), S=s, index=i, keep=yd >= 0) for i in range(p)], 1
            )  # [L, P, S, G]
            choice = dev_loss.argmin(-1)  # first lowest in grid order
        else:
            choice = torch.zeros(n_layers, p, s, dtype=torch.long, device=device)
        block_bits = bits.gather(3, choice[..., None]).squeeze(3)  # [L, P, S]
        # a prefix without every class has no optimum (the unpenalised intercept diverges): its block is
        # sent with the uniform code, a rule the receiver can apply too
        sizes = torch.tensor(np.diff(self.ends_), dtype=torch.float64, device=device)  # [P]
        complete = torch.stack([self._complete(Y[:, self.order_[:t]], n_classes) for t in prefixes])  # [P, S]
        self.uniform_blocks_ = (~complete).cpu().numpy()
        block_bits = torch.where(complete[None], block_bits, (sizes * math.log2(n_classes))[None, :, None])
        self.block_bits_ = block_bits.cpu().numpy()
        self.block_reg_ = np.asarray(self.grid)[choice.cpu().numpy()]
        self.n_train_ = n
        self.uniform_codelength_ = n * math.log2(n_classes)
        first = self.ends_[0] * math.log2(n_classes)
        self.codelength_ = first + self.block_bits_.sum(1)  # [L, S]
        self.compression_ = self.uniform_codelength_ / self.codelength_
        return self

    @staticmethod
    def _complete(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Whether each label set [S, t] holds every class."""
        hits = torch.zeros(labels.shape[0], n_classes, dtype=torch.bool, device=labels.device)
        return hits.scatter_(1, labels, True).all(1)

    def _nll(
        self, X: torch.Tensor, Y: torch.Tensor, S: int, index: int, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed natural-log loss [L, S, G] of prefix ``index``'s probes on ``X`` [L, M, D] / ``Y`` [S, M]
        (``keep``: which rows count)."""
        probe = self.estimator_
        g, k = len(self.grid), probe.k_
        n_layers, m, _ = X.shape
        first = (S + index * S) * g * k  # the prefix's problems: sets S + index*S .. + S, each G x K rows
        coef = probe.coef_[:, first : first + S * g * k]
        bias = probe.intercept_[:, first : first + S * g * k]
        out = torch.zeros(n_layers, S, g, dtype=torch.float64, device=X.device)
        step = max(1, LOG_CHUNK // max(1, n_layers * S * g * k))
        for r in range(0, m, step):
            z = torch.baddbmm(bias[:, :, None], coef, X[:, r : r + step].transpose(1, 2))
            z = z.view(n_layers, S, g, k, -1)
            y = Y[:, r : r + step][None, :, None, :].expand(n_layers, S, g, -1)
            if k == 1:
                nll = F.softplus(z[:, :, :, 0]) - y.to(z.dtype) * z[:, :, :, 0]
            else:
                nll = torch.logsumexp(z, 3) - z.gather(3, y[:, :, :, None]).squeeze(3)
            if keep is not None:
                nll = nll * keep[r : r + step].to(nll.dtype)
            out += nll.sum(-1, dtype=torch.float64)
        return out

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits [L, S, G, K, M] of the full-train probes (the first ``S`` label sets)."""
        probe = self.estimator_
        g, k = len(self.grid), probe.k_
        rows = self.n_sets_ * g * k
        z = torch.baddbmm(probe.intercept_[:, :rows, None], probe.coef_[:, :rows], X.transpose(1, 2))
        return z.view(X.shape[0], self.n_sets_, g, k, X.shape[1])

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        z = self.decision_function(X)
        return (z[:, :, :, 0] > 0).long() if z.shape[3] == 1 else z.argmax(3)

    def train_metrics(self) -> dict[str, np.ndarray]:
        """Per layer: ``codelength`` (bits), ``uniform_codelength``, ``compression``, and the control's."""
        n_layers = self.codelength_.shape[0]
        out = {
            "codelength": self.codelength_[:, 0],
            "uniform_codelength": np.full(n_layers, self.uniform_codelength_),
            "compression": self.compression_[:, 0],
        }
        if self.n_sets_ > 1:
            out["control_codelength"] = self.codelength_[:, 1]
            out["control_compression"] = self.compression_[:, 1]
        return out

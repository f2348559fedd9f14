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

The probe trained per block is a parameter, ``block_probe``: any registered kind with a
``decision_function`` (its log-likelihoods are the code), with the option sets ``block_options``
(several: tuned per block, as a protocol's candidates; ``probekit probe --probe mdl --protocol
senteval`` sets both from the protocol, so the MDL probe trains the protocol's classifier).

- ``linear`` (the default, the ``senteval-sklearn`` protocol): the block probes are the linear
  probe's problems, one label set per (block, labels) with 0/1 row weights marking the prefix
  (:meth:`LogisticProbe.fit`'s ``weights``), so all layers, all blocks, the regularisation grid, the
  control and the ordinary full-train probe (whose accuracy is reported as every kind's is) are one
  call of the batched L-BFGS, on the CPU or the GPU. The options ``grid``, ``max_iter``, ``tol`` and
  ``history`` are this probe's.
- any other kind (``mlp``: SentEval's classifier, the ``senteval``, ``conneau2018`` and
  ``jawahar2019`` protocols): one fit of the kind per prefix, each its own training on the prefix's
  rows (SentEval's: its epochs, mini-batches and early stopping on dev), every layer, label set and
  grid value of a prefix batched as the kind batches them; then the full-train fit, whose accuracy is
  reported. With the protocol's row order (``fit(order=...)``) a prefix's rows are trained in that
  order, and the full-train fit is exactly the protocol's own fit.

Each block's probe (candidate option set and grid value) is chosen per layer as the one with the
lowest log loss on ``dev`` (not part of what is encoded, so the choice costs no bits); ``--grid 1``
with the linear probe fixes it.

Deviations from the paper: Voita & Titov's probe is an MLP trained per block with early stopping
on dev. With the default (``linear``) block probe it is a convex logistic regression instead (the
same objective at any batch order, so the codelength does not depend on an optimiser's seed), with
``C`` chosen on dev per block; ``--protocol senteval`` / ``conneau2018`` give MLP block probes
(SentEval's), with the L2 value (and for ``conneau2018`` the hidden size and dropout) chosen per block
on dev log loss, where the paper fixes one architecture.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from probekit.config import option
from probekit.errors import ParamError
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind
from probekit.probes.linear import LogisticProbe

FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25.0, 50.0, 100.0)
"""Voita & Titov's block ends, in percent of train."""
ORDER_SEED = 10_007
"""The transmission order is ``torch.randperm(N)`` of a generator seeded ``ORDER_SEED + seed``."""


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


def block_kinds() -> list[str]:
    """The kinds that can be the MDL probe's block probe: every registered kind with a ``decision_function``."""
    return [n for n in PROBE_KINDS.names() if n != "mdl" and hasattr(PROBE_KINDS.get(n), "decision_function")]


@dataclass(frozen=True)
class MDLConfig(KindConfig):
    """Options of the MDL probe: the linear block probe's (its names), the block fractions, the block probe."""

    component: ClassVar[str] = "the MDL probe"
    grid: tuple[float, ...] = option(
        (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
        "Comma-separated C grid of the linear block probes (per block the lowest dev log loss; the full-train "
        "probe by dev accuracy).",
        gt=0,
    )
    max_iter: int = option(1000, "L-BFGS iteration limit (linear block probes).", ge=1)
    tol: float = option(1e-4, "Gradient tolerance (scikit-learn's tol; linear block probes).", gt=0)
    history: int = option(10, "L-BFGS memory (pairs of past steps; linear block probes).", ge=1)
    fractions: tuple[float, ...] = option(
        FRACTIONS, "Block ends in percent of train, increasing, the last 100 (Voita & Titov's).", gt=0, le=100
    )
    block_probe: str = option(
        "linear", "The probe kind trained on each block's prefix (--protocol sets it).", choices=block_kinds
    )
    block_options: tuple[dict[str, Any], ...] = option(
        (), "The block probe's option sets, tuned per block on dev (set from --protocol).", cli=False
    )

    def check(self) -> None:
        super().check()
        fr = tuple(self.fractions)
        if len(fr) < 2 or any(b <= a for a, b in itertools.pairwise(fr)) or fr[-1] != 100:
            raise ParamError("fractions", f"must be at least two increasing percentages ending at 100, got {fr}")
        block_configs(self)  # every option set is the block probe's


def block_configs(cfg: MDLConfig) -> list[KindConfig]:
    """The block probe's validated option sets: ``block_options`` (none: the kind's defaults) over, for the
    linear probe, the MDL probe's own ``grid``, ``max_iter``, ``tol``, ``history``."""
    cls = PROBE_KINDS.get(cfg.block_probe)
    shared = {k: getattr(cfg, k) for k in cls.Config.field_names() if hasattr(cfg, k)} if cls is LogisticProbe else {}
    return [cls.Config.from_mapping({**shared, **o}) for o in (cfg.block_options or ({},))]


@PROBE_KINDS.register("mdl", aliases=("online-code",))
class MDLProbe(ProbeKind):
    """Online codelength (Voita & Titov) on every layer; accuracy from the full-train block probe."""

    Config = MDLConfig
    reg_name = "C"
    step_name = "iter"
    limit_option = "max_iter"
    fixed_settings: ClassVar[dict[str, Any]] = {"solver": "lbfgs", "code": "online"}
    config: MDLConfig

    @cached_property
    def _configs(self) -> list[KindConfig]:
        return block_configs(self.config)

    @property
    def _batched(self) -> bool:
        """One linear option set: every block is a weighted problem of one batched L-BFGS call."""
        return self.config.block_probe == "linear" and len(self._configs) == 1

    @property
    def grid(self) -> tuple[float, ...]:
        """The option sets' grids one after the other (what ``predict``'s grid axis indexes)."""
        return tuple(v for c in self._configs for v in c.grid)  # type: ignore[attr-defined]

    def _new(self, config: KindConfig) -> ProbeKind:
        return PROBE_KINDS.get(self.config.block_probe)(config, seed=self.seed)

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        if not self._batched:  # the block probe's own names and fixed settings, not the linear probe's
            block = self._new(self._configs[0])
            out.update(reg_name=block.reg_name, solver=None, **block.fixed_settings)
        return out

    def fit(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: Callable[[int, int], None] | None = None,
        order: Any = None,
    ) -> MDLProbe:
        """As :meth:`ProbeKind.fit`; ``order`` (the protocol's train order, e.g. SentEval's) goes to block probes
        that take one; the transmission order is the MDL probe's own (:func:`transmission_order`)."""
        n_layers, n, _ = X.shape
        s = Y.shape[0]
        device = X.device
        self.n_sets_, self.n_classes_ = s, n_classes
        self.order_ = transmission_order(n, self.seed).to(device)
        self.ends_ = block_ends(n, tuple(self.config.fractions))
        prefixes = self.ends_[:-1]  # block i+1 is encoded by the probe trained on the first ends_[i] rows
        complete = torch.stack([self._complete(Y[:, self.order_[:t]], n_classes) for t in prefixes])  # [P, S]
        if self._batched:
            bits, dev_loss = self._fit_batched(X, Y, n_classes, dev, callback)
        else:  # the block probe's grid is what the rows' reg values are; its limits are not MDL options
            self.reg_name, self.limit_option = self._new(self._configs[0]).reg_name, ""  # type: ignore[misc]
            bits, dev_loss = self._fit_each(X, Y, n_classes, dev, callback, order, complete)
        # bits, dev_loss: [L, P, S, G] (dev_loss None: nothing to choose), each block under each probe
        if dev_loss is not None and len(self.grid) > 1:
            choice = dev_loss.argmin(-1)  # first lowest in (option set, grid) order
        else:
            choice = torch.zeros(n_layers, len(prefixes), s, dtype=torch.long, device=device)
        block_bits = bits.gather(3, choice[..., None]).squeeze(3)  # [L, P, S]
        # a prefix without every class has no optimum (the unpenalised intercept diverges): its block is
        # sent with the uniform code, a rule the receiver can apply too
        sizes = torch.tensor(np.diff(self.ends_), dtype=torch.float64, device=device)  # [P]
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

    def _fit_batched(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None,
        callback: Callable[[int, int], None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear block probes: full train and every prefix as weighted problems of one L-BFGS call."""
        n_layers, n, _ = X.shape
        s, device = Y.shape[0], X.device
        prefixes = self.ends_[:-1]
        rank = torch.empty(n, dtype=torch.long, device=device)
        rank[self.order_] = torch.arange(n, device=device)
        masks = torch.stack([(rank < t) for t in prefixes]).to(X.dtype)  # [P, N]
        p = len(prefixes)
        labels = torch.cat([Y, Y.repeat(p, 1)])  # [S + P*S, N]: full train, then (prefix, set)
        weights = torch.cat([torch.ones(s, n, dtype=X.dtype, device=device), masks.repeat_interleave(s, dim=0)])
        probe = self._new(self._configs[0])
        assert isinstance(probe, LogisticProbe)
        self.estimators_ = [probe]
        probe.fit(X, labels, n_classes, dev=dev, callback=callback, weights=weights, order=self.order_)
        self.n_iter_ = None if getattr(probe, "n_iter_", None) is None else probe.n_iter_[:, :s]
        self.not_converged_ = int(getattr(probe, "not_converged_", 0))
        g = len(self.grid)
        nll = torch.zeros(n_layers, p, s, g, dtype=torch.float64, device=device)
        dev_loss = None if dev is None else torch.zeros_like(nll)
        for i, t in enumerate(prefixes):
            trained = probe.label_sets(s * (i + 1), s * (i + 2))  # the probes of prefix i
            rows = self.order_[t : self.ends_[i + 1]]
            nll[:, i] = trained.log_loss(X[:, rows], Y[:, rows])
            if dev is not None:
                xd, yd = dev
                dev_loss[:, i] = trained.log_loss(xd, yd[None].expand(s, -1), keep=yd >= 0)  # type: ignore[index]
        return nll / math.log(2), dev_loss

    def _fit_each(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        n_classes: int,
        dev: tuple[torch.Tensor, torch.Tensor] | None,
        callback: Callable[[int, int], None] | None,
        order: Any,
        complete: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Any block probe: per option set, one fit per prefix (each its own training on the prefix) and the
        full-train fit; bits and dev losses concatenated over the option sets along the grid axis."""
        n_layers = X.shape[0]
        s, device = Y.shape[0], X.device
        prefixes = self.ends_[:-1]
        protocol_order = None if order is None else torch.as_tensor(np.asarray(order), device=device).long()
        takes_order = "order" in inspect.signature(self._new(self._configs[0]).fit).parameters
        bits_all, dev_all, self.estimators_ = [], [], []
        n_iter, self.not_converged_ = [], 0
        for config in self._configs:
            g = len(config.grid)  # type: ignore[attr-defined]
            bits = torch.zeros(n_layers, len(prefixes), s, g, dtype=torch.float64, device=device)
            dev_loss = torch.zeros_like(bits)
            for i, t in enumerate(prefixes):
                if not bool(complete[i].any()):  # every set sent with the uniform code: nothing to train
                    continue
                rows = self.order_[:t]
                if protocol_order is not None:  # the prefix's rows in the protocol's order
                    rows = protocol_order[torch.isin(protocol_order, rows)]
                probe = self._new(config)
                extra = {"order": torch.arange(t, device=device)} if takes_order else {}
                probe.fit(X[:, rows], Y[:, rows], n_classes, dev=dev, callback=callback, **extra)
                block = self.order_[t : self.ends_[i + 1]]
                bits[:, i] = probe.log_loss(X[:, block], Y[:, block]) / math.log(2)
                if dev is not None:
                    xd, yd = dev
                    dev_loss[:, i] = probe.log_loss(xd, yd[None].expand(s, -1), keep=yd >= 0)
            full = self._new(config)
            extra = {"order": protocol_order} if takes_order and protocol_order is not None else {}
            full.fit(X, Y, n_classes, dev=dev, callback=callback, **extra)
            self.estimators_.append(full)
            self.not_converged_ += int(getattr(full, "not_converged_", 0))
            n_iter.append(getattr(full, "n_iter_", None))
            bits_all.append(bits)
            dev_all.append(dev_loss)
        self.n_iter_ = None if any(i is None for i in n_iter) else torch.cat(n_iter, 2)
        return torch.cat(bits_all, 3), (None if dev is None else torch.cat(dev_all, 3))

    @staticmethod
    def _complete(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Whether each label set [S, t] holds every class."""
        hits = torch.zeros(labels.shape[0], n_classes, dtype=torch.bool, device=labels.device)
        return hits.scatter_(1, labels, True).all(1)

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits [L, S, G, K, M] of the full-train probes (the first ``S`` label sets of the batched fit)."""
        if self._batched:
            return self.estimators_[0].label_sets(0, self.n_sets_).decision_function(X)  # type: ignore[attr-defined]
        return torch.cat([e.decision_function(X) for e in self.estimators_], 2)  # type: ignore[attr-defined]

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        if self._batched:
            return self.estimators_[0].label_sets(0, self.n_sets_).predict(X)  # type: ignore[attr-defined]
        return torch.cat([e.predict(X) for e in self.estimators_], 2)

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

"""Probe protocols: the literature's set-ups as named presets over the probe kinds (:data:`PROTOCOLS`).

A protocol says which probe kind to train, with which options, on which pooling, in which row
order, and which of its settings are tuned on dev. Every results row records it (``protocol``).

- ``senteval-sklearn`` (the default): SentEval's ``usepytorch=False`` path, the ``linear`` probe
  (L2 logistic regression, ``C`` in 2^-2..2^3 on dev), deterministic.
- ``senteval``: SentEval's default protocol, what its README calls comparable to the literature:
  logistic regression (``mlp`` with ``nhid=0``) trained with Adam (lr 1e-3), batch 64, coupled L2
  in 1e-5..1e-2 chosen on dev, early stopping every ``epoch_size=4`` epochs with ``tenacity=5``,
  ``max_epoch=200``, seed 1111, mean loss, SentEval's row order and seeding.
- ``conneau2018``: Conneau et al. (2018), SentEval's MLP with ``nhid`` in 50/100/200 and dropout in
  0/0.1/0.2 tuned on dev together with L2; WordContent with ``nhid=0`` (as SentEval forces it).
- ``jawahar2019``: Jawahar et al. (2019), "What does BERT learn about the structure of language?":
  MLP ``nhid=50``, dropout 0, Adam, batch 64, tenacity 5, epoch_size 4, on the [CLS] vector
  (``--pool cls``). ``first_round_only`` reproduces their released code, which returns from the
  training loop after the first ``epoch_size`` round (off by default).

A new protocol is a :class:`Protocol` subclass with a ``Config``, registered in :data:`PROTOCOLS`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

from probekit.config import Config, option
from probekit.errors import ProbekitError
from probekit.registry import Registry

SENTEVAL_GRID = (1e-5, 1e-4, 1e-3, 1e-2)
"""SentEval's PyTorch L2 grid (``[10**t for t in range(-5, -1)]``)."""
SENTEVAL_MLP = {"dropout": 0.0, "batch_size": 64, "lr": 1e-3, "epoch_size": 4, "tenacity": 5, "max_epoch": 200}
"""SentEval's ``MLP`` defaults (``optim="adam"``)."""


@dataclass(frozen=True)
class ProtocolConfig(Config):
    """Base of a protocol's options."""


class Protocol:
    """A preset: ``kind`` and :meth:`candidates` (the option sets of that kind tuned on dev, in order: the
    first best dev accuracy wins), ``pools`` (the poolings it is defined on; empty: any) and
    ``senteval_order`` (train in SentEval's row order)."""

    Config: ClassVar[type[ProtocolConfig]] = ProtocolConfig
    kind: ClassVar[str] = "linear"
    pools: ClassVar[tuple[str, ...]] = ()
    senteval_order: ClassVar[bool] = False

    def __init__(self, config: ProtocolConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @property
    def name(self) -> str:
        for name, cls in PROTOCOLS.items():
            if cls is type(self):
                return name
        return type(self).__name__

    def candidates(self, task: str | None = None) -> list[dict[str, Any]]:
        """The kind's option sets tried on ``task`` (one: nothing tuned beyond the kind's grid)."""
        return [{}]

    def check_pool(self, pool: str, task: str) -> None:
        """Refuse a cache of a pooling the protocol is not defined on, naming the ``--pool`` to extract."""
        if self.pools and pool not in self.pools:
            raise ProbekitError(
                f"{task}: the {self.name} protocol probes the {'/'.join(self.pools)}-pooled vector and this cache "
                f"is {pool}-pooled; extract with --pool {self.pools[0]}"
            )

    def settings(self) -> dict[str, Any]:
        return {"protocol": self.name, **{f"protocol_{k}": v for k, v in self.config.to_dict().items()}}


PROTOCOLS: Registry[type[Protocol]] = Registry("probe protocol", "protocol")
"""Every protocol by name (see the module docstring)."""


@PROTOCOLS.register("senteval-sklearn", aliases=("sklearn",))
class SentEvalSklearn(Protocol):
    """SentEval's usepytorch=False path: L2 logistic regression (the linear probe), C on dev."""

    kind = "linear"


@PROTOCOLS.register("senteval")
class SentEval(Protocol):
    """SentEval's default: logistic regression by Adam, L2 1e-5..1e-2 on dev, early stopping, seed 1111."""

    kind = "mlp"
    senteval_order = True

    def candidates(self, task: str | None = None) -> list[dict[str, Any]]:
        return [{**SENTEVAL_MLP, "nhid": 0, "grid": SENTEVAL_GRID}]


@dataclass(frozen=True)
class ConneauConfig(ProtocolConfig):
    component: ClassVar[str] = "the conneau2018 protocol"
    nhid_grid: tuple[int, ...] = option((50, 100, 200), "Hidden sizes tuned on dev (conneau2018).", ge=1)
    dropout_grid: tuple[float, ...] = option((0.0, 0.1, 0.2), "Dropouts tuned on dev (conneau2018).", ge=0, lt=1)


@PROTOCOLS.register("conneau2018")
class Conneau2018(Protocol):
    """Conneau et al. 2018: SentEval's MLP, nhid x dropout x L2 tuned on dev; WordContent with nhid 0."""

    Config = ConneauConfig
    kind = "mlp"
    senteval_order = True
    config: ConneauConfig

    def candidates(self, task: str | None = None) -> list[dict[str, Any]]:
        base = {**SENTEVAL_MLP, "grid": SENTEVAL_GRID}
        if task == "word_content":  # SentEval's probing.py forces nhid=0 for WordContent
            return [{**base, "nhid": 0}]
        pairs = itertools.product(self.config.nhid_grid, self.config.dropout_grid)
        return [{**base, "nhid": h, "dropout": p} for h, p in pairs]


@dataclass(frozen=True)
class JawaharConfig(ProtocolConfig):
    component: ClassVar[str] = "the jawahar2019 protocol"
    first_round_only: bool = option(
        False, "Return after the first epoch_size round, as Jawahar et al.'s released code (jawahar2019)."
    )


@PROTOCOLS.register("jawahar2019")
class Jawahar2019(Protocol):
    """Jawahar et al. 2019: SentEval's MLP (nhid 50, dropout 0) on the [CLS] vector."""

    Config = JawaharConfig
    kind = "mlp"
    pools = ("cls",)
    senteval_order = True
    config: JawaharConfig

    def candidates(self, task: str | None = None) -> list[dict[str, Any]]:
        rounds = {"max_rounds": 1} if self.config.first_round_only else {}
        return [{**SENTEVAL_MLP, "nhid": 50, "grid": SENTEVAL_GRID, **rounds}]


def make_protocol(name: str | Protocol, **options: Any) -> Protocol:
    """A protocol by name (or alias) with its options validated (an unknown one is a ``ParamError``)."""
    if isinstance(name, Protocol):
        return name
    cls = PROTOCOLS.get(name)
    return cls(cls.Config.from_mapping(options))


def curve_probe(probe: Any, protocol: Any) -> Any:
    """The name a fit's curve goes by: its protocol's, unless that is the linear probe's own default (so two
    protocols of one probe kind are two curves, in the analyses and in the predictions files alike); a probe
    that is not the protocol's own kind (the MDL probe training the protocol's classifier) ``probe-protocol``.
    Idempotent: a name already derived stays as it is."""
    if not isinstance(protocol, str) or protocol == "senteval-sklearn":
        return probe
    if probe == protocol or (isinstance(probe, str) and probe.endswith(f"-{protocol}")):
        return probe
    own = PROTOCOLS.get(protocol).kind if protocol in PROTOCOLS.names() else None
    return protocol if own is None or probe in (None, own) else f"{probe}-{protocol}"


def protocol_of(kind: str) -> str | None:
    """The protocol recorded for a fit made without one: ``senteval-sklearn`` for the linear probe."""
    return "senteval-sklearn" if kind == "linear" else None

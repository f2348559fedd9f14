"""Exit policies: when a sample leaves the encoder, decided layer by layer.

Every policy is a component of :data:`EXIT_POLICIES` (a :class:`~probekit.registry.Registry`;
plugins add theirs there) with its options in a :class:`PolicyConfig` (or a subclass), in the
scikit-learn dialect: ``__init__`` stores the config, ``fit(record)`` learns the shapes and, for the
learned policies, their modules (attributes ending in ``_``) and returns the policy. It is written
once, as a step function over a batch (``start`` then ``step`` at layers 1..L), and used twice:
offline by :func:`simulate` over the per-layer outputs recorded on a whole split (the threshold
sweeps), and online by the early-exit inference of :mod:`probekit.offramp.inference`, which stops
running layers once a sample exits. The last layer always exits.

- ``entropy`` (DeeBERT): exit when the entropy of the off-ramp's softmax is below S.
- ``confidence``: exit when the largest class probability reaches t.
- ``patience`` (PABEE): exit when t consecutive off-ramps agree with the one before
  (regression: predictions differ by less than ``tolerance``).
- ``lte`` (BERxiT's learning-to-exit): u_i = sigmoid(c . h_i + b), trained (squared error) to
  predict 1[off-ramp i is correct] (regression: 1 - tanh|prediction - label|); exit when u_i > t.
- ``pondernet``: PonderNet's halting probabilities lambda_i = sigmoid(w . h_i + b), trained with
  the PonderNet objective, with sampling exit (at layer i, exit with probability lambda_i). It
  has no threshold: the sweep is over the prior's lambda_p (one trained lambda layer each).
- ``qexit`` (PALBERT): lambda_i from a 3-layer tanh MLP on [h_i, h_{i-1}], trained with the
  PonderNet objective; deterministic Q-exit at the first layer where the CDF of p(i|x) reaches q.
- ``fixed``: every sample exits at layer t (the forced-exit curve, for timing it).

PonderNet objective (Banino et al., 2021; PALBERT, Balagansky & Gavrilov, 2022):
``sum_i p(i|x) loss_i + beta * KL(p(.|x) || geometric(lambda_p))`` with
``p(i|x) = lambda_i prod_{j<i} (1 - lambda_j)`` and the last layer taking the remaining mass
(the prior is truncated to L layers and normalised the same way). Fitted post hoc, the off-ramps are
fixed and the halting layers learn on the recorded outputs of a held-out split; the ``pondernet`` and
``palbert`` training methods (:mod:`probekit.offramp.exit_methods`) train them with the encoder instead,
and these policies then use the trained module (:meth:`Policy.adopt`), as ``lte`` uses BERxiT's.

h_i is layer i's first-token state, standardised per layer with the held-out split's
statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probekit import metrics as M
from probekit.config import Config, option
from probekit.cpu import cpu_threads
from probekit.errors import ProbekitError
from probekit.offramp.heads import Record
from probekit.registry import Registry

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PolicyConfig(Config):
    """Options of the exit policies: the learned ones' training settings (LTE, PonderNet, PALBERT) and the
    patience tolerance. ``epochs``, ``lr``, ``batch_size`` and ``seed`` are no CLI options (the CLI's
    ``--epochs``/``--lr``/``--batch-size`` are the off-ramps'; the run's ``seed`` sets this one)."""

    component: ClassVar[str] = "the exit policies"

    epochs: int = option(40, "Learned policies: training epochs.", ge=1, cli=False)
    lr: float = option(5e-3, "Learned policies: Adam learning rate.", gt=0, cli=False)
    batch_size: int = option(256, "Learned policies: batch size.", ge=1, cli=False)
    beta: float = option(0.5, "Post-hoc pondernet/qexit policies: weight of the KL to the geometric prior.", ge=0)
    prior_lambda: float = option(0.1, "Post-hoc qexit policy: lambda_p of the geometric prior.", gt=0, le=1)
    mlp_hidden: int = option(128, "Post-hoc qexit policy: width of the lambda MLP.", ge=1)
    tolerance: float = option(0.1, "Patience on regression: consecutive predictions closer than this agree.", ge=0)
    seed: int = option(0, "Seed of the learned policies' training (the run's seed overrides it).", ge=0, cli=False)


# ---------------------------------------------------------------- building blocks


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) along the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def halting_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """p(i|x) = lambda_i prod_{j<i}(1 - lambda_j), the last layer taking the remaining mass: [N, L]."""
    lam = lambdas.clone()
    lam[..., -1] = 1.0
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[..., :1]), 1 - lam[..., :-1]], dim=-1), dim=-1)
    return lam * survive


def geometric_prior(prior_lambda: float, n_layers: int) -> torch.Tensor:
    """The geometric prior truncated to ``n_layers`` (last layer normalised): [L]."""
    return halting_distribution(torch.full((n_layers,), float(prior_lambda), dtype=torch.float64)).float()


def ponder_loss(lambdas: torch.Tensor, losses: torch.Tensor, beta: float, prior_lambda: float) -> torch.Tensor:
    """PonderNet's objective, averaged over samples: expected task loss under p(i|x) + beta * KL(p || prior)."""
    p = halting_distribution(lambdas)
    prior = geometric_prior(prior_lambda, lambdas.shape[-1]).to(p)
    kl = (p * (torch.log(p.clamp_min(1e-12)) - torch.log(prior))).sum(-1)
    return ((p * losses).sum(-1) + beta * kl).mean()


def expected_saving(exit_layers: np.ndarray, n_layers: int) -> float:
    """DeeBERT's eq. 2: 1 - sum_i i N_i / sum_i n N_i (n = number of layers, N_i exits at layer i)."""
    exit_layers = np.asarray(exit_layers)
    if not len(exit_layers):
        return float("nan")
    return float(1.0 - exit_layers.sum() / (n_layers * len(exit_layers)))


def exit_histogram(exit_layers: np.ndarray, n_layers: int) -> np.ndarray:
    """Number of samples exiting at each layer 1..L: [L]."""
    return np.bincount(np.asarray(exit_layers, dtype=np.int64), minlength=n_layers + 1)[1 : n_layers + 1]


class Standardize(nn.Module):
    """Per-layer standardisation of first-token states (statistics of the fitting split)."""

    def __init__(self, hidden: np.ndarray) -> None:
        super().__init__()
        h = torch.as_tensor(np.asarray(hidden, dtype=np.float32))
        self.register_buffer("mean", h.mean(0))
        self.register_buffer("std", h.std(0).clamp_min(1e-4))

    @classmethod
    def identity(cls, n_states: int, dim: int) -> Standardize:
        """No standardisation (a module trained with the encoder reads its states as they are)."""
        norm = cls(np.zeros((2, n_states, dim), np.float32))
        norm.mean.zero_()
        norm.std.fill_(1.0)
        return norm

    def forward(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        if layer is None:  # all layers at once: [N, L+1, D]
            return (h - self.mean) / self.std
        return (h - self.mean[layer]) / self.std[layer]


def _zero_linear(dim: int) -> nn.Linear:
    """A linear layer to one logit starting at 0 (probability 1/2 for every input)."""
    lin = nn.Linear(dim, 1)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _train(module: nn.Module, loss_fn: Any, n: int, cfg: PolicyConfig, desc: str, progress: bool) -> list[float]:
    """Adam over shuffled mini-batches of ``n`` samples; ``loss_fn(idx)`` gives a batch's loss (single-threaded:
    the modules are tiny)."""
    with cpu_threads(1):
        return _train_loop(module, loss_fn, n, cfg, desc, progress)


def _train_loop(module: nn.Module, loss_fn: Any, n: int, cfg: PolicyConfig, desc: str, progress: bool) -> list[float]:
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for _ in tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            loss = loss_fn(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / max(n, 1))
    module.eval()
    return history


# ---------------------------------------------------------------- policies

EXIT_POLICIES: Registry[type[Policy]] = Registry("exit policy", "policy")
"""Every exit policy, by name (aliases: the paper's method, e.g. ``pabee``); plugins register theirs here."""


class Policy:
    """An exit rule (scikit-learn dialect): ``__init__`` stores the options, :meth:`fit` learns the shapes
    (``n_layers_``, ``n_classes_``) from a record, and the learned policies their modules (ending in ``_``);
    subclasses define :meth:`step` and :meth:`thresholds`. Register one with ``@EXIT_POLICIES.register(name)``."""

    name: ClassVar[str] = ""
    threshold_name: ClassVar[str] = "threshold"
    learned: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    classification_only: ClassVar[bool] = False
    default: ClassVar[bool] = True
    """Part of the default set (``policies="all"``)."""
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config

    @property
    def options(self) -> PolicyConfig:
        """The options in force (the defaults when ``config`` is None)."""
        return self.config if self.config is not None else self.config_class()

    @property
    def regression_(self) -> bool:
        return self.n_classes_ == 0

    def set_shape(self, n_layers: int, n_classes: int) -> Self:
        """Record the shapes a policy runs on (``n_classes=0``: regression); what :meth:`fit` learns first."""
        if self.classification_only and n_classes == 0:
            raise ProbekitError(
                f"exit policy {self.name!r} needs class probabilities; a regression task has none "
                "(use patience, lte, pondernet or qexit)"
            )
        self.n_layers_ = int(n_layers)
        self.n_classes_ = int(n_classes)
        self.history_: dict[str, list[float]] = {}
        return self

    def fit(self, rec: Record, progress: bool = False) -> Self:
        """Learn from the recorded outputs of a held-out split (rule-based policies: the shapes only)."""
        return self.set_shape(rec.n_layers, 0 if rec.regression else int(rec.outputs.shape[-1]))

    def thresholds(self) -> list[float]:
        raise NotImplementedError

    def adopt(self, rec: Record, components: dict[str, Any]) -> bool:
        """Use a module the training method trained (``components``: ``lte``, ``halting``) instead of
        fitting one post hoc; False when this policy has none to use (then :meth:`fit` fits it)."""
        return False

    def start(self, n: int, device: torch.device | str = "cpu", seed: int = 0) -> State:
        """Fresh per-sample state for a batch of ``n``."""
        return {}

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        """Whether each sample exits at ``layer`` (1-based), given its off-ramp ``output`` ([B, C]),
        first-token state ``hidden`` of this layer and ``prev`` of the layer below ([B, D])."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The learned tensors (nested dicts of tensors; empty for rule-based policies)."""
        return {}

    def to(self, device: torch.device | str) -> Policy:
        """Move the learned modules (if any) to ``device``."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
            elif isinstance(value, dict):
                for v in value.values():
                    if isinstance(v, nn.Module):
                        v.to(device)
        return self


@EXIT_POLICIES.register("entropy", aliases=("deebert",))
class EntropyPolicy(Policy):
    """DeeBERT: exit when the entropy of the off-ramp's softmax is below S."""

    name = "entropy"
    threshold_name = "S"
    classification_only = True

    def thresholds(self) -> list[float]:
        top = math.log(max(self.n_classes_, 2))
        return [round(top * f, 6) for f in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        return entropy(output) < threshold


@EXIT_POLICIES.register("confidence", aliases=("maxprob",))
class ConfidencePolicy(Policy):
    """Exit when the largest class probability reaches t."""

    name = "confidence"
    threshold_name = "t"
    classification_only = True

    def thresholds(self) -> list[float]:
        low = 1.0 / max(self.n_classes_, 2)
        return [round(low + (1 - low) * f, 6) for f in (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)]

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        return torch.softmax(output.float(), dim=-1).max(-1).values >= threshold


@EXIT_POLICIES.register("patience", aliases=("pabee",))
class PatiencePolicy(Policy):
    """PABEE: exit when t consecutive off-ramps agree with the one before."""

    name = "patience"
    threshold_name = "t"

    def thresholds(self) -> list[float]:
        return [float(t) for t in range(self.n_layers_)]

    def start(self, n: int, device: torch.device | str = "cpu", seed: int = 0) -> State:
        return {
            "count": torch.zeros(n, dtype=torch.long, device=device),
            "prev": torch.zeros(n, dtype=torch.float32 if self.regression_ else torch.long, device=device),
        }

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        pred = output[:, 0].float() if self.regression_ else output.argmax(-1)
        if layer > 1:
            same = (pred - state["prev"]).abs() < self.options.tolerance if self.regression_ else pred == state["prev"]
            state["count"] = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        state["prev"] = pred
        return state["count"] >= threshold


class LTEPolicy(Policy):
    """BERxiT's learning-to-exit module: one linear layer shared by all layers."""

    name = "lte"
    threshold_name = "t"
    learned = True

    def thresholds(self) -> list[float]:
        return [round(x, 2) for x in np.linspace(0.0, 1.0, 11)]

    def fit(self, rec: Record, progress: bool = False) -> Self:
        super().fit(rec)
        self.norm_ = Standardize(rec.hidden)
        self.net_ = _zero_linear(rec.hidden.shape[-1])
        x = self.norm_(torch.from_numpy(rec.hidden))[:, 1:]  # [N, L, D]
        pred = torch.from_numpy(rec.predictions())
        labels = torch.from_numpy(np.asarray(rec.labels))[:, None]
        correct = (pred == labels).float()
        target = 1 - torch.tanh((pred.float() - labels.float()).abs()) if self.regression_ else correct
        net = self.net_
        self.history_["lte"] = _train(
            net,
            lambda idx: ((torch.sigmoid(net(x[idx])[..., 0]) - target[idx]) ** 2).mean(),
            len(x),
            self.options,
            "LTE",
            progress,
        )
        return self

    def adopt(self, rec: Record, components: dict[str, Any]) -> bool:
        if "lte" not in components:
            return False
        Policy.fit(self, rec)
        self.norm_ = Standardize.identity(rec.hidden.shape[1], rec.hidden.shape[2])
        self.net_ = components["lte"].net
        return True

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        return torch.sigmoid(self.net_(self.norm_(hidden, layer))[:, 0]) > threshold

    def state_dict(self) -> dict[str, Any]:
        return {"norm": self.norm_.state_dict(), "net": self.net_.state_dict()}


class PonderNetPolicy(Policy):
    """PonderNet's lambda layer (linear, shared by all layers) with sampling exit."""

    name = "pondernet"
    threshold_name = "prior_lambda"
    learned = True
    stochastic = True

    def thresholds(self) -> list[float]:
        if getattr(self, "halting_", None) is not None:
            return [self.halting_prior_]
        return [0.05, 0.1, 0.2, 0.4, 0.8]

    def adopt(self, rec: Record, components: dict[str, Any]) -> bool:
        """The halting layer the method trained (with the prior it was trained under: the one threshold)."""
        if "halting" not in components:
            return False
        Policy.fit(self, rec)
        self.halting_ = components["halting"]
        self.halting_prior_ = float(components["prior_lambda"])
        return True

    def _make(self, dim: int) -> nn.Module:
        return _zero_linear(dim)

    def _lambdas(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Halting probabilities of layers 1..L from standardised states of layers 0..L ([N, L+1, D])."""
        return torch.sigmoid(net(x[:, 1:])[..., 0])

    def _lambda_step(self, net: nn.Module, layer: int, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        if getattr(self, "halting_", None) is not None:
            return self.halting_.step(hidden, prev)
        return torch.sigmoid(net(self.norm_(hidden, layer))[:, 0])

    def _fit_one(self, rec: Record, prior_lambda: float, progress: bool) -> nn.Module:
        cfg = self.options
        torch.manual_seed(cfg.seed)
        net = self._make(rec.hidden.shape[-1])
        x = self.norm_(torch.from_numpy(rec.hidden))
        losses = torch.from_numpy(rec.losses()).float()
        self.history_[f"{self.name}@{prior_lambda}"] = _train(
            net,
            lambda idx: ponder_loss(self._lambdas(net, x[idx]), losses[idx], cfg.beta, prior_lambda),
            len(x),
            cfg,
            f"{self.name} lambda_p={prior_lambda}",
            progress,
        )
        return net

    def fit(self, rec: Record, progress: bool = False) -> Self:
        super().fit(rec)
        self.norm_ = Standardize(rec.hidden)
        self.nets_ = {float(p): self._fit_one(rec, float(p), progress) for p in self.thresholds()}
        return self

    def lambdas(self, hidden: np.ndarray, threshold: float) -> torch.Tensor:
        """Halting probabilities [N, L] for first-token states of layers 0..L (last layer set to 1)."""
        with torch.no_grad():
            if getattr(self, "halting_", None) is not None:
                lam = self.halting_(torch.as_tensor(hidden))
            else:
                lam = self._lambdas(self._net(threshold), self.norm_(torch.as_tensor(hidden)))
        lam[:, -1] = 1.0
        return lam

    def _net(self, threshold: float) -> nn.Module:
        if getattr(self, "halting_", None) is not None:
            return self.halting_
        return self.nets_[float(threshold)]

    def start(self, n: int, device: torch.device | str = "cpu", seed: int = 0) -> State:
        self.generator_ = torch.Generator().manual_seed(seed)
        return {}

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        lam = self._lambda_step(self._net(threshold), layer, hidden, prev)
        if layer == self.n_layers_:
            lam = torch.ones_like(lam)  # the last layer takes the remaining mass
        draw = torch.rand(len(lam), generator=self.generator_).to(lam.device)
        return draw < lam

    def state_dict(self) -> dict[str, Any]:
        if getattr(self, "halting_", None) is not None:
            return {"halting": self.halting_.state_dict()}
        return {"norm": self.norm_.state_dict(), "nets": {str(k): v.state_dict() for k, v in self.nets_.items()}}


class QExitPolicy(PonderNetPolicy):
    """PALBERT: lambda_i from a 3-layer tanh MLP on [h_i, h_{i-1}], deterministic Q-exit."""

    name = "qexit"
    threshold_name = "q"
    stochastic = False

    def thresholds(self) -> list[float]:
        return [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]

    def _make(self, dim: int) -> nn.Module:
        h = self.options.mlp_hidden
        return nn.Sequential(nn.Linear(2 * dim, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 1))

    def _lambdas(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(net(torch.cat([x[:, 1:], x[:, :-1]], dim=-1))[..., 0])

    def _lambda_step(self, net: nn.Module, layer: int, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        if getattr(self, "halting_", None) is not None:
            return self.halting_.step(hidden, prev)
        x = torch.cat([self.norm_(hidden, layer), self.norm_(prev, layer - 1)], dim=-1)
        return torch.sigmoid(net(x)[:, 0])

    def fit(self, rec: Record, progress: bool = False) -> Self:
        Policy.fit(self, rec)
        self.norm_ = Standardize(rec.hidden)
        self.net_ = self._fit_one(rec, self.options.prior_lambda, progress)
        return self

    def _net(self, threshold: float) -> nn.Module:
        return self.halting_ if getattr(self, "halting_", None) is not None else self.net_

    def start(self, n: int, device: torch.device | str = "cpu", seed: int = 0) -> State:
        return {"survive": torch.ones(n, device=device), "cdf": torch.zeros(n, device=device)}

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        lam = self._lambda_step(self._net(threshold), layer, hidden, prev)
        if layer == self.n_layers_:
            lam = torch.ones_like(lam)
        state["cdf"] = state["cdf"] + lam * state["survive"]
        state["survive"] = state["survive"] * (1 - lam)
        return state["cdf"] >= threshold

    def state_dict(self) -> dict[str, Any]:
        if getattr(self, "halting_", None) is not None:
            return {"halting": self.halting_.state_dict()}
        return {"norm": self.norm_.state_dict(), "net": self.net_.state_dict()}


class FixedPolicy(Policy):
    """Every sample exits at layer t (the forced-exit curve, for timing it)."""

    name = "fixed"
    threshold_name = "layer"
    default = False

    def thresholds(self) -> list[float]:
        return [float(i) for i in range(1, self.n_layers_ + 1)]

    def step(
        self, state: State, layer: int, output: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        return torch.full((len(output),), layer >= threshold, dtype=torch.bool, device=output.device)


# registration order is the order of the default set and of the help
EXIT_POLICIES.register("lte", LTEPolicy, aliases=("berxit",))
EXIT_POLICIES.register("pondernet", PonderNetPolicy)
EXIT_POLICIES.register("qexit", QExitPolicy, aliases=("palbert",))
EXIT_POLICIES.register("fixed", FixedPolicy)


def default_policies(regression: bool) -> list[str]:
    """The default set: the registered policies marked ``default`` that fit the task."""
    return [n for n, cls in EXIT_POLICIES.items() if cls.default and not (regression and cls.classification_only)]


def parse_policies(names: str | Sequence[str] | None, regression: bool) -> list[str]:
    """Policy names from a list or a comma-separated string (default: all that fit the task)."""
    if names is None or names == "" or names == "all":
        return default_policies(regression)
    items = names.split(",") if isinstance(names, str) else list(names)
    out = []
    for raw in items:
        key = EXIT_POLICIES.canonical(raw.strip())
        if key not in out:
            out.append(key)
    return out


def make_policy(name: str, n_layers: int, n_classes: int, cfg: PolicyConfig | None = None) -> Policy:
    """A registered policy with its shapes set (rule-based policies are then ready; learned ones need ``fit``)."""
    return EXIT_POLICIES.get(name)(cfg).set_shape(n_layers, n_classes)


# ---------------------------------------------------------------- offline evaluation


def simulate(policy: Policy, rec: Record, threshold: float, seed: int = 0) -> np.ndarray:
    """Exit layer (1..L) of every sample of a record under ``policy`` at ``threshold``."""
    n, n_layers = len(rec), rec.n_layers
    outputs = torch.from_numpy(np.ascontiguousarray(rec.outputs))
    hidden = torch.from_numpy(np.ascontiguousarray(rec.hidden, dtype=np.float32))
    policy.to("cpu")
    state = policy.start(n, seed=seed)
    exit_at = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        for layer in range(1, n_layers + 1):
            out = policy.step(state, layer, outputs[:, layer - 1], hidden[:, layer], hidden[:, layer - 1], threshold)
            if layer == n_layers:
                out = torch.ones_like(out)
            exit_at[out & (exit_at == 0)] = layer
    return exit_at.numpy()


@dataclass
class SweepPoint:
    """One threshold of one policy, evaluated on a record."""

    policy: str
    threshold: float
    exit_layers: np.ndarray
    scores: dict[str, float]
    threshold_name: str = "threshold"
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mean_exit_layer(self) -> float:
        return float(np.mean(self.exit_layers))

    def expected_saving(self, n_layers: int) -> float:
        return expected_saving(self.exit_layers, n_layers)


def exit_predictions(rec: Record, exit_layers: np.ndarray) -> np.ndarray:
    """Each sample's prediction at its exit layer."""
    return rec.predictions()[np.arange(len(rec)), np.asarray(exit_layers) - 1]


def sweep(
    policy: Policy, rec: Record, metric_names: Sequence[str], thresholds: Sequence[float] | None = None, seed: int = 0
) -> list[SweepPoint]:
    """Evaluate ``policy`` at each threshold (default: its own sweep) on ``rec``."""
    points = []
    for t in thresholds if thresholds is not None else policy.thresholds():
        exits = simulate(policy, rec, float(t), seed=seed)
        scores = M.score(metric_names, rec.labels, exit_predictions(rec, exits))
        points.append(SweepPoint(policy.name, float(t), exits, scores, policy.threshold_name))
    return points

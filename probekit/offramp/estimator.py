"""``OffRamps``: off-ramps at every layer as a scikit-learn-style estimator, for a notebook.

Trained on fixed first-token states (the ``frozen`` method: an array ``[N, L+1, D]``, 0 = the
embeddings, or a ``pool="cls"`` :class:`~probekit.cache.LayerCache`), without an output folder::

    ramps = OffRamps(epochs=5).fit(cache)             # the cache's train split and labels
    ramps.score(cache.features("dev"), cache.labels("dev"))   # the task metric at layers 1..L
    ramps.rows(dev_states, dev_labels, model="minilm", task="sst2")   # tidy results rows

``__init__`` only stores the options; :meth:`fit` learns the off-ramps (``heads_``, an
:class:`~probekit.offramp.heads.OffRampHeads`), the shapes (``n_layers_``, ``n_classes_``) and the
loss history (``history_``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import torch

from probekit import metrics as M
from probekit.errors import ParamError, ProbekitError
from probekit.offramp.heads import OffRampHeads, Record, predict, record
from probekit.offramp.train import TrainConfig, fit_heads
from probekit.results import row


def _states_and_labels(states: Any, labels: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``states`` as [N, L+1, D] and its labels (a cache gives both for ``split``)."""
    if hasattr(states, "features") and callable(states.features):  # a LayerCache
        cache = states
        if getattr(cache, "pool", "cls") != "cls":
            raise ProbekitError(f"off-ramps read the first token: use a pool='cls' cache, not {cache.pool!r}")
        states = cache.features(split)
        labels = cache.labels(split) if labels is None else labels
    x = np.asarray(states)
    if x.ndim != 3 or x.shape[1] < 2:
        raise ParamError("states", f"must be first-token states of every layer, [N, L+1, D]; got shape {x.shape}")
    if labels is None:
        raise ParamError("labels", "are needed (or pass a LayerCache, which holds them)")
    y = np.array(labels)  # a copy: a cache's labels are a read-only map
    if len(y) != len(x):
        raise ParamError("labels", f"has {len(y)} entries for {len(x)} states")
    return x, y


def infer_n_classes(labels: np.ndarray) -> int:
    """Classes of integer labels (max + 1), 0 (regression) for real-valued ones."""
    y = np.asarray(labels)
    if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
        return 0
    return int(y.max()) + 1 if len(y) else 0


def layer_rows(base: dict[str, Any], rec: Record, metric_names: Sequence[str]) -> list[dict[str, Any]]:
    """Tidy rows (``source="offramp"``) of the task metric(s) when every sample exits at layer 1, 2, ..., L."""
    preds = rec.predictions()
    n_layers = rec.n_layers
    rows = []
    for i in range(n_layers):
        scores = M.score(metric_names, rec.labels, preds[:, i])
        rows += [
            row(
                **base,
                source="offramp",
                layer=i + 1,
                metric=m,
                value=v,
                n=len(rec),
                expected_saving=1 - (i + 1) / n_layers,
            )
            for m, v in scores.items()
        ]
    return rows


def default_metrics(regression: bool) -> list[str]:
    return list(M.REGRESSION_METRICS) if regression else ["acc"]


class OffRamps:
    """One off-ramp (DeeBERT's pooler + linear) per transformer layer, trained on fixed first-token states.

    ``n_classes``: None infers it from the labels (integers: max + 1; real values: regression, 0).
    """

    mode = "frozen"
    """The training method it stands for, in results rows."""

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        dropout: float = 0.1,
        seed: int = 0,
        n_classes: int | None = None,
        device: str = "cpu",
        progress: bool = False,
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.seed = seed
        self.n_classes = n_classes
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------ parameters

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters if p != "self"}

    def set_params(self, **params: Any) -> Self:
        known = self.get_params()
        for k, v in params.items():
            if k not in known:
                raise ParamError(k, f"is not a parameter of OffRamps; its parameters: {', '.join(known)}")
            setattr(self, k, v)
        return self

    @classmethod
    def from_config(cls, cfg: TrainConfig, **params: Any) -> OffRamps:
        """The estimator with a training config's off-ramp settings (``head_batch_size``, ``head_lr``, ...)."""
        return cls(
            epochs=cfg.n_epochs(finetune=False),
            batch_size=cfg.head_batch_size,
            lr=cfg.head_lr,
            weight_decay=cfg.weight_decay,
            dropout=cfg.dropout,
            seed=cfg.seed,
            **params,
        )

    def train_config(self) -> TrainConfig:
        """The parameters as the training kernel's config (validated there: a bad value is a ParamError)."""
        return TrainConfig(
            epochs=self.epochs,
            head_batch_size=self.batch_size,
            head_lr=self.lr,
            weight_decay=self.weight_decay,
            dropout=self.dropout,
            seed=self.seed,
        )

    # ------------------------------------------------------------ fitting and using

    def fit(self, states: Any, labels: Any = None, split: str = "train") -> Self:
        """Train the off-ramps on first-token states ``[N, L+1, D]`` (or a cache's ``split``) and labels."""
        cfg = self.train_config()
        x, y = _states_and_labels(states, labels, split)
        n_classes = infer_n_classes(y) if self.n_classes is None else int(self.n_classes)
        torch.manual_seed(cfg.seed)
        self.heads_ = OffRampHeads(x.shape[1] - 1, x.shape[2], n_classes, cfg.dropout).to(self.device)
        self.history_ = fit_heads(self.heads_, x[:, 1:], y, cfg, progress=self.progress)
        self.n_layers_ = self.heads_.n_layers
        self.n_classes_ = n_classes
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "heads_"):
            raise ProbekitError("this OffRamps is not fitted yet; call fit(states, labels) first")

    def outputs(self, states: Any, split: str = "dev") -> np.ndarray:
        """Every off-ramp's output: [N, L, C] (C = 1 for regression)."""
        self._check_fitted()
        x = np.asarray(states.features(split) if hasattr(states, "features") else states)
        return self.heads_.outputs(np.asarray(x[:, 1:], dtype=np.float32))

    def record(self, states: Any, labels: Any = None, split: str = "dev") -> Record:
        """The off-ramps' outputs with the states and labels: what exit policies fit and run on."""
        self._check_fitted()
        x, y = _states_and_labels(states, labels, split)
        return record(self.heads_, x, y)

    def predict(self, states: Any, split: str = "dev") -> np.ndarray:
        """[N, L]: each layer's off-ramp prediction (class ids, or values for regression)."""
        return np.asarray(predict(self.outputs(states, split), self.regression_))

    @property
    def regression_(self) -> bool:
        return self.n_classes_ == 0

    def score(self, states: Any, labels: Any = None, metric: str | None = None, split: str = "dev") -> np.ndarray:
        """The task metric (default ``acc``, ``pearson`` for regression) at each exit layer 1..L: [L]."""
        rec = self.record(states, labels, split)
        name = metric or default_metrics(self.regression_)[0]
        preds = rec.predictions()
        return np.array([M.score([name], rec.labels, preds[:, i])[name] for i in range(rec.n_layers)])

    def rows(
        self,
        states: Any,
        labels: Any = None,
        *,
        model: str = "model",
        task: str = "task",
        split: str = "dev",
        metrics: Sequence[str] | None = None,
        **columns: Any,
    ) -> list[dict[str, Any]]:
        """Tidy results rows (:mod:`probekit.results`): the metric(s) at each exit layer 1..L."""
        rec = self.record(states, labels, split)
        base = {
            "model": model,
            "task": task,
            "split": split,
            "probe": "offramp",
            "mode": self.mode,
            "seed": self.seed,
            "pool": "cls",
            **columns,
        }
        return layer_rows(base, rec, list(metrics) if metrics else default_metrics(self.regression_))

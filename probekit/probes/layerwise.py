"""``LayerwiseProbe``: SentEval's protocol on every layer at once, with chance references.

Per layer: train on ``train`` for each value of the regularisation grid, keep the value
with the best ``dev`` accuracy (the first in grid order on a tie, as SentEval's
``np.argmax``), report dev and test accuracy for it. Labels are mapped to ids from the
sorted distinct train labels (SentEval's mapping); a dev/test label never seen in train
can only be predicted wrong. Beside it, with the same grid and selection, a control probe
trained on the train labels permuted by the seed (the "shuffled-label control"), and the
majority class of train.

    probe = LayerwiseProbe(kind="linear", seed=0).fit(X_train, y_train, X_dev, y_dev)
    probe.score(X_test, y_test)          # test accuracy per layer
    probe.best_reg_                      # chosen C per layer

``X`` arrays are in the cache layout [N, layers, D] (NumPy, memory map or torch tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from probekit.backbone import resolve_device
from probekit.cache import release_pages
from probekit.errors import ParamError, ProbekitError
from probekit.metrics import wilson
from probekit.probes.base import PROBE_KINDS, KindConfig, ProbeKind, name_of
from probekit.results import row


def layer_major(X: Any, layers: Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """Features [N, L, D] (NumPy / memory map / tensor) as float32 [len(layers), N, D] on ``device``.

    A tensor already on ``device`` (``LayerCache.to``) becomes a transposed view, copied only
    when a subset of layers is asked for; a NumPy array is read in contiguous row blocks (a memory
    map sequentially) into one contiguous float32 tensor, the only copy the probes make.
    """
    n_all = X.shape[1]
    layers = list(range(n_all)) if layers is None else list(layers)
    if isinstance(X, torch.Tensor):
        x = X.to(device=device, dtype=torch.float32).transpose(0, 1)
        return x if layers == list(range(n_all)) else x[layers]
    out = torch.empty((len(layers), X.shape[0], X.shape[2]), dtype=torch.float32, device=device)
    step = max(1, (1 << 22) // max(1, X.shape[1] * X.shape[2]))
    for r in range(0, X.shape[0], step):  # contiguous row blocks: sequential reads of a memory map
        block = torch.from_numpy(np.array(X[r : r + step])).to(device)  # a writable copy
        block = block if len(layers) == n_all else block[:, layers]
        out[:, r : r + step].copy_(block.transpose(0, 1))  # cast and transpose in one pass
        release_pages(X)  # the map's pages read so far are not kept resident beside the copy
    return out


def nonfinite_layers(X: torch.Tensor, layers: Sequence[int]) -> list[int]:
    """The layers (numbered as in ``layers``) of a layer-major tensor holding NaN or inf."""
    total = X.sum(dim=(1, 2))  # any NaN/inf makes the sum non-finite; confirm (overflow) exactly
    suspect = (~torch.isfinite(total)).nonzero().flatten().tolist()
    return [layers[i] for i in suspect if not bool(torch.isfinite(X[i]).all())]


def _labels(y: Any, device: torch.device) -> torch.Tensor:
    t = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.array(y))  # a copy: memory maps are read-only
    if t.dtype.is_floating_point and not bool((t == t.round()).all()):
        raise ProbekitError("a probe needs class labels; these labels are not integers (a regression task?)")
    return t.to(device=device, dtype=torch.long)


def resolve_kind(kind: str | type[ProbeKind]) -> tuple[str, type[ProbeKind]]:
    """A kind given by name (or alias) or as a class: its name and class."""
    if isinstance(kind, type) and issubclass(kind, ProbeKind):
        return name_of(kind), kind
    if not isinstance(kind, str):
        raise ParamError("kind", f"must be a probe kind's name ({', '.join(PROBE_KINDS.names())}), got {kind!r}")
    name = PROBE_KINDS.canonical(kind)
    return name, PROBE_KINDS.get(name)


def kind_config(
    kind: str | type[ProbeKind], grid: Sequence[float] | str | None = None, **options: Any
) -> tuple[str, type[ProbeKind], KindConfig]:
    """The kind's name, class and validated options (``grid`` None: the kind's default); an option
    that is not the kind's, or a bad value, is a :class:`ParamError` naming it."""
    name, cls = resolve_kind(kind)
    values = dict(options)
    if grid is not None:
        values["grid"] = grid
    return name, cls, cls.Config.from_mapping(values)


class LayerwiseProbe:
    """A probe on every layer, SentEval's protocol, batched (see the module docstring).

    ``kind``: a registered probe kind (:data:`~probekit.probes.base.PROBE_KINDS`: ``linear``,
    logistic regression, grid of ``C``; ``mlp``, SentEval's MLP, grid of weight decays), or a
    :class:`~probekit.probes.base.ProbeKind` class; ``grid`` overrides the kind's default;
    ``options`` are the kind's (fields of its ``Config``: ``tol``, ``max_iter``; ``nhid``,
    ``dropout``, ``batch_size``...). ``seed`` sets the control permutation and any randomness of
    the kind. ``control=False`` skips the control. The constructor only stores these; :meth:`fit`
    validates them.

    After :meth:`fit`: ``kind_`` (the kind's name), ``config_`` (its validated options),
    ``estimator_`` (the fitted kind), ``layers_``, ``classes_``, ``majority_class_``,
    ``dev_scores_`` (dev accuracy [layers, label set, grid]), ``best_index_`` [layers, label set],
    ``best_reg_`` and ``control_reg_`` (chosen grid values per layer), ``n_iter_`` (per problem).
    """

    def __init__(
        self,
        kind: str | type[ProbeKind] = "linear",
        grid: Sequence[float] | None = None,
        seed: int = 0,
        device: str | torch.device = "auto",
        control: bool = True,
        **options: Any,
    ) -> None:
        self.kind = kind
        self.grid = grid
        self.seed = seed
        self.device = device
        self.control = control
        self.options = options

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """The constructor's parameters (scikit-learn's convention; the kind's options flattened in)."""
        return {
            "kind": self.kind,
            "grid": self.grid,
            "seed": self.seed,
            "device": self.device,
            "control": self.control,
            **self.options,
        }

    def set_params(self, **params: Any) -> LayerwiseProbe:
        for key, value in params.items():
            if key in ("kind", "grid", "seed", "device", "control"):
                setattr(self, key, value)
            else:
                self.options = {**self.options, key: value}
        return self

    def settings(self) -> dict[str, Any]:
        """What determines the results: the kind, the control and the kind's options (validated)."""
        name, cls, config = kind_config(self.kind, self.grid, **self.options)
        return {"kind": name, "control": bool(self.control), **cls(config, seed=int(self.seed)).settings()}

    def fit(
        self,
        X: Any,
        y: Any,
        X_dev: Any,
        y_dev: Any,
        layers: Sequence[int] | None = None,
        callback: Callable[[int, int], None] | None = None,
        order: Any = None,
    ) -> LayerwiseProbe:
        """Fit on ``X`` [N, L, D] / ``y`` and select on ``X_dev`` / ``y_dev``; ``layers`` (default all)
        says which layers to probe; ``order`` (kinds that take it, as ``mlp``) the train rows in the order
        SentEval trains them (:func:`probekit.senteval.senteval_order`)."""
        self.kind_, cls, self.config_ = kind_config(self.kind, self.grid, **self.options)
        seed = int(self.seed)
        self.estimator_: ProbeKind = cls(self.config_, seed=seed)
        device = resolve_device(self.device)
        self.device_ = device
        self.layers_ = list(range(X.shape[1])) if layers is None else [int(i) for i in layers]
        if not self.layers_:
            raise ProbekitError("no layer to probe")
        y_t = _labels(y, device)
        if len(y_t) == 0 or X.shape[0] != len(y_t):
            raise ProbekitError(
                f"the train split has {X.shape[0]} feature rows and {len(y_t)} labels; "
                "a probe needs a non-empty train split with one label per row"
            )
        if len(_labels(y_dev, device)) == 0:
            raise ProbekitError("the dev split is empty; the protocol selects the regularisation on dev")
        self.classes_ = torch.unique(y_t)
        if len(self.classes_) < 2:
            raise ProbekitError(
                f"the train split has a single class ({self.classes_.tolist()[0]}); a probe needs at least two"
            )
        n_classes = len(self.classes_)
        y_ids = torch.searchsorted(self.classes_, y_t)
        counts = torch.bincount(y_ids, minlength=n_classes)
        self.majority_class_ = int(self.classes_[int(torch.argmax(counts))])
        sets = [y_ids]
        if self.control:
            gen = torch.Generator().manual_seed(seed)
            sets.append(y_ids[torch.randperm(len(y_ids), generator=gen).to(device)])
        x = self._features(X, "train")
        xd = self._features(X_dev, "dev")
        yd = self._map(y_dev)
        extra = {} if order is None else {"order": order}
        self.estimator_.fit(x, torch.stack(sets), n_classes, dev=(xd, yd), callback=callback, **extra)
        del x
        correct = (self.estimator_.predict(xd) == yd).float().mean(-1)  # [L, S, G]
        self.dev_scores_ = correct.cpu().numpy()
        self.best_index_ = correct.argmax(-1)  # first best in grid order
        grid = np.asarray(self.estimator_.grid)
        best = self.best_index_.cpu().numpy()
        self.best_reg_ = grid[best[:, 0]]
        self.control_reg_ = grid[best[:, 1]] if self.control else None
        n_iter = getattr(self.estimator_, "n_iter_", None)
        self.n_iter_ = n_iter.cpu().numpy() if n_iter is not None else None
        self.not_converged_ = int(getattr(self.estimator_, "not_converged_", 0))
        return self

    def _features(self, X: Any, split: str) -> torch.Tensor:
        x = layer_major(X, self.layers_, self.device_)
        bad = nonfinite_layers(x, self.layers_)
        if bad:
            raise ProbekitError(
                f"the {split} features hold NaN or inf at layer(s) {bad}; "
                "re-extract with storage_dtype float32 or probe other layers"
            )
        return x

    def _map(self, y: Any) -> torch.Tensor:
        """Class ids as in training; labels unseen in train become -1 (never predicted)."""
        y_t = _labels(y, self.device_)
        pos = torch.searchsorted(self.classes_, y_t).clamp(max=len(self.classes_) - 1)
        return torch.where(self.classes_[pos] == y_t, pos, -1)

    def _predict_ids(self, X: Any, split: str = "input") -> torch.Tensor:
        """Class ids [layers, label sets, M] of the selected model of each layer and label set."""
        pred = self.estimator_.predict(self._features(X, split))  # [L, S, G, M]
        idx = self.best_index_[:, :, None, None].expand(-1, -1, 1, pred.shape[-1])
        return pred.gather(2, idx).squeeze(2)

    def predict(self, X: Any, control: bool = False) -> np.ndarray:
        """Predicted labels [layers, M] (the control probe's with ``control=True``)."""
        if control and not self.control:
            raise ProbekitError("this probe was fitted with control=False")
        ids = self._predict_ids(X)[:, 1 if control else 0]
        return self.classes_[ids].cpu().numpy()

    def score(self, X: Any, y: Any, control: bool = False) -> np.ndarray:
        """Accuracy per layer on ``X`` / ``y``."""
        return self.correct(X, y)["control" if control else "probe"] / len(y)

    def correct(self, X: Any, y: Any, split: str = "input") -> dict[str, np.ndarray]:
        """How many of ``y`` each layer gets right: ``probe``, ``control`` (when fitted) and
        ``majority`` (the same count for every layer), as arrays [layers]."""
        y_ids = self._map(y)
        hits = (self._predict_ids(X, split) == y_ids).sum(-1).cpu().numpy()  # [L, S]
        majority = int((_labels(y, self.device_) == self.majority_class_).sum())
        out = {"probe": hits[:, 0], "majority": np.full(len(self.layers_), majority)}
        if self.control:
            out["control"] = hits[:, 1]
        return out

    def correct_each(self, X: Any, y: Any, split: str = "input") -> np.ndarray:
        """Which examples of ``y`` each layer's selected probe gets right: bool [layers, M] (the paired
        tests of :mod:`probekit.stats` resample these)."""
        return (self._predict_ids(X, split)[:, 0] == self._map(y)).cpu().numpy()

    def rows(self, X: Any, y: Any, split: str = "test", **columns: Any) -> list[dict[str, Any]]:
        """Tidy rows (:func:`probekit.results.row`) of this probe on ``X`` / ``y``: per layer ``acc``,
        ``control_acc`` and ``control_gap`` (acc - control_acc; when fitted with the control) and ``majority_acc``, with
        a 95% Wilson interval and the chosen grid value; ``columns`` (model, task, ...) go in every row."""
        n = len(y)
        hits = self.correct(X, y, split)
        base = {"source": "probe", "probe": self.kind_, "seed": int(self.seed), **columns}
        out = []
        for i, layer in enumerate(self.layers_):
            common = {"model": None, "task": None, **base, "layer": layer, "split": split, "n": n}
            out.append(_metric(common, "acc", hits["probe"][i], n, self.best_reg_[i]))
            if self.control:
                out.append(_metric(common, "control_acc", hits["control"][i], n, self.control_reg_[i]))
                gap = hits["probe"][i] / n - hits["control"][i] / n
                out.append(row(**common, metric="control_gap", value=gap, ci_low=None, ci_high=None, reg=None))
            out.append(_metric(common, "majority_acc", hits["majority"][i], n, None))
        return out

    def train_rows(self, **columns: Any) -> list[dict[str, Any]]:
        """Tidy rows (``split="train"``) of what the kind measured while fitting
        (:meth:`~probekit.probes.base.ProbeKind.train_metrics`: the MDL probe's codelengths); none for most."""
        metrics = self.estimator_.train_metrics()
        n = int(getattr(self.estimator_, "n_train_", 0)) or None
        base = {"source": "probe", "probe": self.kind_, "seed": int(self.seed), **columns}
        out = []
        for metric, values in metrics.items():
            for i, layer in enumerate(self.layers_):
                common = {"model": None, "task": None, **base, "layer": layer, "split": "train", "n": n}
                out.append(row(**common, metric=metric, value=float(values[i]), ci_low=None, ci_high=None, reg=None))
        return out


def _metric(base: dict[str, Any], metric: str, correct: int, n: int, reg: float | None) -> dict[str, Any]:
    low, high = wilson(correct, n)
    return row(
        **base,
        metric=metric,
        value=correct / n,
        ci_low=float(low),
        ci_high=float(high),
        reg=None if reg is None else float(reg),
    )

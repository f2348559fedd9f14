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
from probekit.errors import ProbekitError
from probekit.probes.base import ProbeKind, get_kind


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
        block = torch.from_numpy(np.array(X[r : r + step])).to(device).float()  # a writable copy
        out[:, r : r + step] = block[:, layers].transpose(0, 1)
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


class LayerwiseProbe:
    """A probe on every layer, SentEval's protocol, batched (see the module docstring).

    ``kind``: ``linear`` (logistic regression, grid of ``C``) or ``mlp`` (SentEval's MLP,
    grid of weight decays); ``grid`` overrides the kind's default; ``options`` go to the kind
    (``tol``, ``max_iter``; ``nhid``, ``dropout``, ``batch_size``...). ``seed`` sets the
    control permutation and any randomness of the kind. ``control=False`` skips the control.

    After :meth:`fit`: ``layers_``, ``classes_``, ``majority_class_``, ``dev_scores_`` (dev
    accuracy [layers, label set, grid]), ``best_index_`` [layers, label set], ``best_reg_``
    and ``control_reg_`` (chosen grid values per layer), ``n_iter_`` (per problem) and
    ``estimator_`` (the fitted kind).
    """

    def __init__(
        self,
        kind: str = "linear",
        grid: Sequence[float] | None = None,
        seed: int = 0,
        device: str | torch.device = "auto",
        control: bool = True,
        **options: Any,
    ) -> None:
        self.kind, self.seed, self.device, self.control = kind, int(seed), device, control
        cls = get_kind(kind)
        try:
            self.estimator_: ProbeKind = cls(grid=grid, seed=self.seed, **options)
        except TypeError as e:
            raise ProbekitError(f"bad option for the {kind} probe: {e}") from None
        self.grid = self.estimator_.grid

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "control": self.control, **self.estimator_.settings()}

    def fit(
        self,
        X: Any,
        y: Any,
        X_dev: Any,
        y_dev: Any,
        layers: Sequence[int] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> LayerwiseProbe:
        """Fit on ``X`` [N, L, D] / ``y`` and select on ``X_dev`` / ``y_dev``; ``layers`` (default all)
        says which layers to probe."""
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
            gen = torch.Generator().manual_seed(self.seed)
            sets.append(y_ids[torch.randperm(len(y_ids), generator=gen).to(device)])
        x = self._features(X, "train")
        xd = self._features(X_dev, "dev")
        yd = self._map(y_dev)
        self.estimator_.fit(x, torch.stack(sets), n_classes, dev=(xd, yd), callback=callback)
        del x
        correct = (self.estimator_.predict(xd) == yd).float().mean(-1)  # [L, S, G]
        self.dev_scores_ = correct.cpu().numpy()
        self.best_index_ = correct.argmax(-1)  # first best in grid order
        grid = np.asarray(self.grid)
        best = self.best_index_.cpu().numpy()
        self.best_reg_ = grid[best[:, 0]]
        self.control_reg_ = grid[best[:, 1]] if self.control else None
        self.n_iter_ = self.estimator_.n_iter_.cpu().numpy() if self.estimator_.n_iter_ is not None else None
        return self

    def _features(self, X: Any, split: str) -> torch.Tensor:
        x = layer_major(X, self.layers_, self.device_)
        bad = nonfinite_layers(x, self.layers_)
        if bad:
            raise ProbekitError(
                f"the {split} features hold NaN or inf at layer(s) {bad}; "
                "re-extract with --storage-dtype float32 or probe other layers"
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

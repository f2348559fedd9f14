"""``TunedProbe``: several option sets of one probe kind, the best on dev per layer (Conneau et al.'s tuning).

Each candidate is a :class:`~probekit.probes.layerwise.LayerwiseProbe` (its own grid selected on dev
as usual); per layer and label set the candidate with the best dev accuracy is kept (the first in
candidate order on a tie, as ``np.argmax``), so the probe and the control are each tuned the same way.
The rows carry the chosen options as extra columns (``nhid``, ``dropout``: those that differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from probekit.errors import ProbekitError
from probekit.probes.layerwise import LayerwiseProbe


class TunedProbe(LayerwiseProbe):
    """``candidates``: the kind's option sets tried (each with ``kind``, ``grid``, ``seed``... of this probe)."""

    def __init__(self, candidates: Sequence[dict[str, Any]], **params: Any) -> None:
        super().__init__(**params)
        self.candidates = list(candidates)

    def _members(self) -> list[LayerwiseProbe]:
        if not self.candidates:
            raise ProbekitError("a tuned probe needs at least one candidate option set")
        return [LayerwiseProbe(**{**self.get_params(), **c}) for c in self.candidates]

    def settings(self) -> dict[str, Any]:
        first = self._members()[0].settings()
        return {**first, "candidates": [m.settings() for m in self._members()]}

    def fit(
        self,
        X: Any,
        y: Any,
        X_dev: Any,
        y_dev: Any,
        layers: Sequence[int] | None = None,
        callback: Callable[[int, int], None] | None = None,
        order: Any = None,
    ) -> TunedProbe:
        self.members_ = [
            m.fit(X, y, X_dev, y_dev, layers=layers, callback=callback, order=order) for m in self._members()
        ]
        first = self.members_[0]
        self.kind_, self.config_, self.estimator_ = first.kind_, first.config_, first.estimator_
        self.device_, self.layers_, self.classes_ = first.device_, first.layers_, first.classes_
        self.majority_class_ = first.majority_class_
        dev = np.stack([m.dev_scores_.max(-1) for m in self.members_])  # [C, L, S]
        self.choice_ = dev.argmax(0)  # [L, S]: first best candidate
        self.dev_scores_ = dev.max(0)[..., None]
        layer_idx = np.arange(len(self.layers_))
        self.best_reg_ = np.stack([m.best_reg_ for m in self.members_])[self.choice_[:, 0], layer_idx]
        self.control_reg_ = (
            np.stack([m.control_reg_ for m in self.members_])[self.choice_[:, 1], layer_idx] if self.control else None
        )
        self.n_iter_ = None
        self.not_converged_ = sum(m.not_converged_ for m in self.members_)
        return self

    def correct(self, X: Any, y: Any, split: str = "input") -> dict[str, np.ndarray]:
        each = [m.correct(X, y, split) for m in self.members_]
        idx = np.arange(len(self.layers_))
        out = {"majority": each[0]["majority"], "probe": np.stack([e["probe"] for e in each])[self.choice_[:, 0], idx]}
        if self.control:
            out["control"] = np.stack([e["control"] for e in each])[self.choice_[:, 1], idx]
        return out

    def correct_each(self, X: Any, y: Any, split: str = "input") -> np.ndarray:
        each = np.stack([m.correct_each(X, y, split) for m in self.members_])  # [C, L, M]
        return each[self.choice_[:, 0], np.arange(len(self.layers_))]

    def predict(self, X: Any, control: bool = False) -> np.ndarray:
        preds = np.stack([m.predict(X, control=control) for m in self.members_])  # [C, L, M]
        return preds[self.choice_[:, 1 if control else 0], np.arange(len(self.layers_))]

    def rows(self, X: Any, y: Any, split: str = "test", **columns: Any) -> list[dict[str, Any]]:
        out = super().rows(X, y, split, **columns)
        varied = [k for k in self.candidates[0] if len({repr(c.get(k)) for c in self.candidates}) > 1]
        position = {layer: i for i, layer in enumerate(self.layers_)}
        for r in out:
            s = {"acc": 0, "control_acc": 1}.get(r["metric"])
            if s is None:
                continue
            chosen = self.candidates[int(self.choice_[position[r["layer"]], s])]
            r.update({k: chosen[k] for k in varied})
        return out

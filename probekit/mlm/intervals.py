"""Passage-level uncertainty of the MLM-head probe, and the dip-and-recovery statistic.

Tokens of one passage are not independent (a passage's topic, its rare words), so the intervals
resample whole passages: each bootstrap draw takes as many passages as there are, with
replacement, and the accuracy of the draw is its hits over its scored tokens (a ratio estimator).

The convexity paper's claim about MLM heads is a *dip* among the upper layers (the head names the
input token worst at the penultimate layer) and a *recovery* at the last one. Per model:
``dip_layer`` is the layer of the lowest accuracy among the upper half of the layers, and
``recovery = acc(L) - acc(L-1)`` with its passage-bootstrap 95% interval (above 0: the last layer
recovers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BOOT = 2000


def _passage_sums(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``values`` ([windows] or [layers, windows]) per passage, and the passage labels."""
    labels, inverse = np.unique(groups, return_inverse=True)
    rows = np.atleast_2d(values)
    out = np.stack([np.bincount(inverse, weights=r, minlength=len(labels)) for r in rows])
    return (out[0] if values.ndim == 1 else out), labels


def bootstrap_accuracy(hits: np.ndarray, n: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap accuracies [n_boot, layers] from per-window ``hits`` [layers, windows], tokens ``n``
    [windows] and the passage of each window ``groups``, resampling passages."""
    h, _ = _passage_sums(np.asarray(hits, dtype=float), groups)
    t, _ = _passage_sums(np.asarray(n, dtype=float), groups)
    p = t.shape[0]
    rng = np.random.default_rng([seed, 0xB007])
    out = np.empty((n_boot, h.shape[0]))
    for start in range(0, n_boot, 256):
        idx = rng.integers(0, p, size=(min(256, n_boot - start), p))
        out[start : start + len(idx)] = h[:, idx].sum(-1).T / np.maximum(t[idx].sum(-1), 1)[:, None]
    return out


def passage_intervals(
    hits: np.ndarray, n: np.ndarray, groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0
) -> np.ndarray:
    """95% percentile intervals [layers, 2] of each layer's accuracy, passages resampled."""
    boot = bootstrap_accuracy(hits, n, groups, n_boot, seed)
    return np.stack([np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)], axis=1)


def dip_recovery(
    hits: np.ndarray, n: np.ndarray, groups: np.ndarray, layers: list[int], n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any] | None:
    """The dip layer (lowest accuracy among the upper half of ``layers``) and the recovery
    ``acc(L) - acc(L-1)`` with its passage-bootstrap interval; None when L-1 and L are not both probed."""
    order = np.argsort(layers)
    ls = [layers[i] for i in order]
    if len(ls) < 2 or ls[-1] - ls[-2] != 1:
        return None
    hits = np.asarray(hits, dtype=float)[order]
    acc = hits.sum(1) / max(float(np.sum(n)), 1.0)
    upper = [i for i, layer in enumerate(ls) if layer >= ls[-1] / 2]
    dip = upper[int(np.argmin(acc[upper]))]
    boot = bootstrap_accuracy(hits[-2:], n, groups, n_boot, seed)
    rec = boot[:, 1] - boot[:, 0]
    return {
        "dip_layer": int(ls[dip]),
        "recovery": float(acc[-1] - acc[-2]),
        "ci_low": float(np.quantile(rec, 0.025)),
        "ci_high": float(np.quantile(rec, 0.975)),
    }

"""The official GLUE metrics, in one place for every analysis that scores a task.

Each metric takes gold labels and predictions (class ids, or floats for regression)
and returns a float; :func:`score` computes a task's list of metrics at once::

    from probekit import metrics
    metrics.score(["acc", "f1"], y_true, y_pred)     # {"acc": 0.84, "f1": 0.88}
    metrics.task_metrics(get_task("mrpc"))           # ["acc", "f1"]

GLUE's choices: Matthews correlation (CoLA), accuracy and F1 of the positive class
(MRPC, QQP), Pearson and Spearman correlation (STS-B, regression), accuracy (the rest).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from probekit.errors import ProbekitError

Metric = Callable[[np.ndarray, np.ndarray], float]

Z95 = 1.959963984540054
"""The standard normal 97.5% quantile: two-sided 95% intervals."""


def wilson(correct: Any, n: Any, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion ``correct / n`` (arrays broadcast)."""
    k, n = np.asarray(correct, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z2 = z * z
    with np.errstate(divide="ignore", invalid="ignore"):  # n = 0: (nan, nan)
        p = k / n
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Binary F1 of class id 1 (GLUE's positive class: paraphrase / duplicate)."""
    from sklearn.metrics import (
        f1_score,
    )  # deferred: a slow import, for GLUE scores only

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), pos_label=1, average="binary", zero_division=0.0))


def mcc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Matthews correlation coefficient (0 when a side is constant, as scikit-learn defines it)."""
    from sklearn.metrics import (
        matthews_corrcoef,
    )  # deferred: a slow import, for GLUE scores only

    return float(matthews_corrcoef(np.asarray(y_true), np.asarray(y_pred)))


def _correlation(fn: Callable[..., Any], y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return float("nan")  # undefined for a constant side; scipy would warn and return nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(y_true, y_pred)[0])


def pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from scipy.stats import pearsonr  # deferred: a slow import, for GLUE scores only

    return _correlation(pearsonr, y_true, y_pred)


def spearman(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from scipy.stats import spearmanr  # deferred: a slow import, for GLUE scores only

    return _correlation(spearmanr, y_true, y_pred)


METRICS: dict[str, Metric] = {"acc": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}
REGRESSION_METRICS = ("pearson", "spearman")


def score(names: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Every metric in ``names`` of ``y_pred`` against ``y_true``."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ProbekitError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return {n: METRICS[n](y_true, y_pred) for n in names}


def task_metrics(task: Any) -> list[str]:
    """The official metrics of a task (a ``Task``): its registry ``metrics``, else accuracy."""
    options = getattr(task, "options", {}) or {}
    return list(options.get("metrics") or ["acc"])


def is_regression(task: Any) -> bool:
    """Whether a task's targets are real numbers (STS-B) rather than classes."""
    options = getattr(task, "options", {}) or {}
    return options.get("type") == "regression"

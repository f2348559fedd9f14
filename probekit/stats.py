"""The statistics of a convexity claim: paired bootstrap tests over test sentences.

The peak layer's and the last layer's accuracies come from the same test sentences, so the
drop ``acc(peak) - acc(last)`` is tested paired: sentences are resampled with replacement
(the same resample for every layer and seed), and the drop's bootstrap distribution gives its
95% percentile interval and a two-sided p-value ``2 min(P*(drop <= 0), P*(drop >= 0))`` (with
the usual +1 correction). Several seeds of one curve share the test sentences: in every
resample the per-seed drops are averaged, so the combined statistic is the seed-mean drop and
its interval holds sentence and seed variation alike. The peak layer is chosen on ``dev`` (mean
over seeds), never on the test sentences the drop is measured on; the bootstrap distribution of
the test argmax says how sure that peak is (``peak_share``: how often the chosen layer is the
argmax). "N of M tasks drop significantly" is counted after Holm's step-down correction across
the tasks of one model, probe and pooling.

:func:`delta_tests` is the same paired test for fine-tuned minus pre-trained accuracy per layer
(same sentences, two models), Holm-corrected across the layers and tasks of each fine-tuned model.

    from probekit import stats
    preds = stats.load_predictions("runs/demo/results")    # written by probekit probe --out
    stats.convexity_tests(preds)                             # one row per model, probe, pool, task
    stats.paired_bootstrap(correct_peak, correct_last)       # the test itself, on bool arrays
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.probes.predictions import Predictions, load_predictions

N_BOOT = 10_000
CHUNK = 256
"""Resamples drawn at once (bounds the memory of a [resamples, sentences] index array)."""

__all__ = ["N_BOOT", "convexity_tests", "delta_tests", "holm", "load_predictions", "paired_bootstrap"]


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap means of ``values`` [M, C] over its rows: [n_boot, C] (sentences resampled with replacement)."""
    rng = np.random.default_rng(seed)
    m = values.shape[0]
    out = np.empty((n_boot, values.shape[1]))
    for start in range(0, n_boot, CHUNK):
        idx = rng.integers(0, m, size=(min(CHUNK, n_boot - start), m))
        out[start : start + len(idx)] = values[idx].mean(1)
    return out


def _p_two_sided(boot: np.ndarray) -> float:
    b = len(boot)
    low = (np.sum(boot <= 0) + 1) / (b + 1)
    high = (np.sum(boot >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(low, high)))


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Paired bootstrap of ``mean(a) - mean(b)`` for per-sentence correctness ``a``, ``b`` ([M] or
    [seeds, M], bool or 0/1; seeds averaged per sentence): ``diff``, ``ci_low``, ``ci_high``
    (percentile interval), ``p`` (two-sided, H0: no difference), ``se`` (bootstrap standard error)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ProbekitError(f"a paired test needs the same sentences on both sides; got {a.shape[1]} and {b.shape[1]}")
    d = a.mean(0) - b.mean(0)  # [M]: per sentence, seed-mean difference
    boot = _resampled_means(d[:, None], n_boot, seed)[:, 0]
    tail = (1 - level) / 2
    return {
        "diff": float(d.mean()),
        "ci_low": float(np.quantile(boot, tail)),
        "ci_high": float(np.quantile(boot, 1 - tail)),
        "p": _p_two_sided(boot),
        "se": float(boot.std(ddof=1)),
    }


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control; NaN stays NaN)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    vals = p[ok]
    order = np.argsort(vals, kind="stable")
    m = len(vals)
    adj = np.maximum.accumulate((m - np.arange(m)) * vals[order]).clip(max=1.0)
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def _with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``p_holm``: Holm's adjustment of ``p`` within each model, probe and pooling."""
    table["p_holm"] = np.nan
    for _, idx in table.groupby(["model", "probe", "pool"], dropna=False).groups.items():
        table.loc[idx, "p_holm"] = holm(table.loc[idx, "p"].to_numpy())
    return table


def _groups(preds: Sequence[Predictions], keys: tuple[str, ...]) -> dict[tuple[Any, ...], list[Predictions]]:
    groups: dict[tuple[Any, ...], list[Predictions]] = {}
    for p in preds:
        groups.setdefault(tuple(getattr(p, k) for k in keys), []).append(p)
    return groups


def _stack(group: list[Predictions], split: str) -> tuple[np.ndarray, list[int]]:
    """Correctness [seeds, layers, M] of one curve's seeds on ``split`` (one entry per seed: the latest)."""
    by_seed = {p.seed: p for p in group}
    first = next(iter(by_seed.values()))
    for p in by_seed.values():
        if p.layers != first.layers or p.data_sha256 != first.data_sha256 or split not in p.correct:
            raise ProbekitError(
                f"{first.model} / {first.task}: the seeds' predictions differ in layers or data (or lack {split}); "
                "re-run probekit probe on one set of caches"
            )
        if p.correct[split].shape != first.correct[split].shape:
            raise ProbekitError(f"{first.model} / {first.task}: the seeds were scored on different {split} sentences")
    return np.stack([by_seed[s].correct[split] for s in sorted(by_seed)]).astype(float), first.layers


def convexity_tests(
    preds: Sequence[Predictions],
    split: str = "test",
    select: str = "dev",
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per model, probe, pooling and task: the peak layer (chosen on ``select``), the paired bootstrap of
    ``acc(peak) - acc(last)`` on ``split`` (seeds combined), Holm across tasks, and the peak's bootstrap share.

    Columns: ``model probe pool task seeds n layers peak_layer peak last drop ci_low ci_high p p_holm
    significant peak_share argmax_share`` (``argmax_share``: per layer, the share of resamples in which it
    has the highest ``split`` accuracy, as ``{layer: share}``)."""
    rows = []
    for (model, probe, pool, task), group in _groups(preds, ("model", "probe", "pool", "task")).items():
        c, layers = _stack(group, split)  # [S, L, M]
        chosen_on = select if all(select in p.correct for p in group) else split
        sel, _ = _stack(group, chosen_on)
        peak_i = int(np.argmax(sel.mean((0, 2))))  # first best layer
        last_i = len(layers) - 1
        per_sentence = c.mean(0).T  # [M, L] seed-mean correctness
        boot = _resampled_means(per_sentence, n_boot, seed)  # [B, L] accuracy per layer and resample
        drop_boot = boot[:, peak_i] - boot[:, last_i]
        argmax = np.bincount(boot.argmax(1), minlength=len(layers)) / n_boot
        acc = per_sentence.mean(0)
        rows.append(
            {
                "model": model,
                "probe": probe,
                "pool": pool,
                "task": task,
                "seeds": c.shape[0],
                "n": c.shape[2],
                "layers": layers[last_i],
                "peak_on": chosen_on,
                "peak_layer": layers[peak_i],
                "peak": float(acc[peak_i]),
                "last": float(acc[last_i]),
                "drop": float(acc[peak_i] - acc[last_i]),
                "ci_low": float(np.quantile(drop_boot, 0.025)),
                "ci_high": float(np.quantile(drop_boot, 0.975)),
                "p": _p_two_sided(drop_boot) if peak_i != last_i else 1.0,
                "peak_share": float(argmax[peak_i]),
                "argmax_share": {int(layers[i]): round(float(s), 4) for i, s in enumerate(argmax) if s > 0},
            }
        )
    if not rows:
        raise ProbekitError("no predictions to test; run probekit probe with --out (it stores them in OUT/predictions)")
    table = _with_holm(pd.DataFrame(rows))
    table["significant"] = (table["p_holm"] < alpha) & (table["drop"] > 0)
    cols = [c for c in table.columns if c not in ("p_holm", "significant", "peak_share", "argmax_share")]
    return table[[*cols, "p_holm", "significant", "peak_share", "argmax_share"]]


def delta_tests(
    finetuned: Sequence[Predictions],
    pretrained: Sequence[Predictions],
    split: str = "test",
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per fine-tuned model, task and layer: fine-tuned minus pre-trained accuracy on the same ``split``
    sentences (each side's seeds averaged per sentence), its paired bootstrap interval and p-value, and
    Holm across the layers and tasks of each fine-tuned model. Curves are matched on task, probe, pooling
    and data; one with no pre-trained partner is left out."""
    base = _groups(pretrained, ("probe", "pool", "task", "data_sha256"))
    rows = []
    for (model, probe, pool, task, data), group in _groups(
        finetuned, ("model", "probe", "pool", "task", "data_sha256")
    ).items():
        partner = base.get((probe, pool, task, data))
        if partner is None:
            continue
        ft, layers = _stack(group, split)
        pt, pt_layers = _stack(partner, split)
        if pt.shape[2] != ft.shape[2]:
            raise ProbekitError(f"{model} / {task}: the pre-trained predictions are on other {split} sentences")
        common = [layer for layer in layers if layer in pt_layers]
        d = ft[:, [layers.index(x) for x in common]].mean(0) - pt[:, [pt_layers.index(x) for x in common]].mean(0)
        boot = _resampled_means(d.T, n_boot, seed)  # [B, layers]
        for j, layer in enumerate(common):
            rows.append(
                {
                    "model": model,
                    "baseline": partner[0].model,
                    "probe": probe,
                    "pool": pool,
                    "task": task,
                    "layer": layer,
                    "n": ft.shape[2],
                    "delta": float(d[j].mean()),
                    "ci_low": float(np.quantile(boot[:, j], 0.025)),
                    "ci_high": float(np.quantile(boot[:, j], 0.975)),
                    "p": _p_two_sided(boot[:, j]),
                }
            )
    if not rows:
        raise ProbekitError("no fine-tuned predictions match a pre-trained one (same task, probe, pooling and data)")
    table = _with_holm(pd.DataFrame(rows))
    table["significant"] = table["p_holm"] < alpha
    return table

"""Analyses of results tables: seed summaries, layerwise convexity, fine-tuned vs pre-trained deltas.

Pure pandas on the tidy table of :mod:`probekit.results`; the report and notebooks use these::

    from probekit import analysis
    results = probekit.load_results("runs/demo/results")
    analysis.convexity(results)                  # peak layer, drop to the last layer, is it real?
    analysis.deltas(finetuned, pretrained)       # per layer and task: fine-tuned minus pre-trained
    analysis.finetune_grid(d, top=4)             # fine-tuning task x probing task, top-4-layer mean

Only probe rows (``source="probe"``, or rows without a source) enter :func:`convexity` and
:func:`deltas`. A curve is identified by model, probe, pooling and task; several seeds of one
curve are averaged (:func:`seed_summary`).

**Fine-tuning task of a model.** :func:`deltas` labels each fine-tuned model with the GLUE task
it was fine-tuned on, from (in this order) the ``finetune_tasks={model: task}`` argument or a
``finetune_task`` column of the results. Model names are never parsed: ``minilm-cola-seed0`` is
only a name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.probes.protocols import curve_probe

CURVE = ("model", "probe", "pool", "task")
"""What identifies one layerwise curve."""

DATA_IDENTITY = ("probe", "pool", "max_length", "data_sha256")
"""Settings that must be equal for two curves to be comparable (besides task and layer)."""

PROBE_METRICS = ("acc", "control_acc", "control_gap", "majority_acc")
MDL_METRICS = ("codelength", "uniform_codelength", "compression", "control_codelength", "control_compression")
"""The MDL probe's rows (``split="train"``)."""


def _label(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def same(column: pd.Series, value: object) -> pd.Series:
    """``column == value`` where a missing value (None/NaN) equals a missing value."""
    return column.isna() if pd.isna(value) else column == value


def configs(table: pd.DataFrame) -> list[tuple[object, object]]:
    """The distinct (probe, pool) pairs of a table, in order of appearance; a missing value is None."""

    def key(v: object) -> object:
        return None if pd.isna(v) else v

    return list(dict.fromkeys((key(a), key(b)) for a, b in zip(table["probe"], table["pool"], strict=True)))


def splits(results: pd.DataFrame) -> list[str]:
    """The splits of the probe rows, ``test`` first when present."""
    found = set(probe_rows(results)["split"].dropna())
    return sorted(found, key=lambda s: (s != "test", s != "dev", s))


def default_split(results: pd.DataFrame) -> str:
    """``test`` when the probe rows have it, else ``dev``, else whatever split they have."""
    found = splits(results)
    if not found:
        raise ProbekitError("no probe results (rows with source='probe'); run `probekit probe` first")
    return found[0]


def probe_rows(results: pd.DataFrame, split: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """The probe rows of a results table (``source="probe"``, or no source), optionally of one split/metric.

    Raises :class:`ProbekitError` when one curve (model, probe, pooling, task) was made with
    different data or ``max_length`` (they would be averaged together), or when one model name
    belongs to different checkpoints (``model_fingerprint``).
    """
    if results is None or len(results) == 0:
        raise ProbekitError("the results table is empty")
    source = results["source"] if "source" in results.columns else pd.Series(None, index=results.index)
    rows = results[(source == "probe") | source.isna()]
    rows = rows[rows["metric"].isin(PROBE_METRICS + MDL_METRICS)]
    if split is not None:
        rows = rows[rows["split"] == split]
    if metric is not None:
        rows = rows[rows["metric"] == metric]
    rows = rows.copy()
    for col in ("probe", "pool", "max_length", "data_sha256", "seed", "model_fingerprint", "ci_low", "ci_high", "n"):
        if col not in rows.columns:
            rows[col] = None
    if "protocol" in rows.columns:  # a protocol other than the linear probe's own names its curves
        rows["probe"] = [curve_probe(p, q) for p, q in zip(rows["probe"], rows["protocol"], strict=True)]
    for col in ("layer", "value", "ci_low", "ci_high", "n", "seed", "max_length"):
        rows[col] = pd.to_numeric(rows[col])
    _check_identity(rows)
    return rows


def _check_identity(rows: pd.DataFrame) -> None:
    fps = rows.dropna(subset=["model_fingerprint"]).groupby("model")["model_fingerprint"].nunique()
    clash = fps[fps > 1]
    if len(clash):
        raise ProbekitError(
            f"model name {clash.index[0]!r} belongs to {clash.iloc[0]} different checkpoints (model_fingerprint); "
            "give each checkpoint its own name (--name when extracting)"
        )
    ident = rows.groupby(list(CURVE), dropna=False)[["max_length", "data_sha256"]].nunique()
    mixed = ident[(ident > 1).any(axis=1)]
    if len(mixed):
        model, probe, pool, task = mixed.index[0]
        raise ProbekitError(
            f"results for model {model!r}, task {task!r} ({probe} probe, {pool} pooling) were made on different "
            "data or max_length; report them separately"
        )


def seed_summary(results: pd.DataFrame, split: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """Probe curves averaged over seeds: one row per model, probe, pool, task, split, metric and layer.

    Columns: ``value`` (mean over seeds), ``sd`` (standard deviation over seeds, NaN for one seed),
    ``seeds`` (how many), ``ci_low``/``ci_high`` (mean of the per-seed intervals), ``n`` (examples).
    """
    rows = probe_rows(results, split, metric)
    keys = [*CURVE, "split", "metric", "layer"]
    per_seed = rows.groupby([*keys, "seed"], dropna=False, sort=False).agg(
        value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"), n=("n", "max")
    )
    out = per_seed.groupby(keys, dropna=False, sort=False).agg(
        value=("value", "mean"),
        sd=("value", "std"),
        seeds=("value", "size"),
        ci_low=("ci_low", "mean"),
        ci_high=("ci_high", "mean"),
        n=("n", "max"),
    )
    return out.reset_index()


def _per_seed_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """layer x seed table of values for the rows of one curve."""
    return rows.pivot_table(index="layer", columns=rows["seed"].fillna(-1), values="value", aggfunc="mean")


def convexity(results: pd.DataFrame, split: str | None = None, metric: str = "acc") -> pd.DataFrame:
    """Per model, probe, pooling and task: the peak layer, peak and last-layer scores, the drop, and is it real.

    The peak is the layer with the highest seed-mean score (the earliest on ties); ``drop`` is
    ``peak - last`` (0 when the last layer is the peak). ``uncertainty`` is the drop needed to call
    it real: the larger of

    - ``wilson``: the gap that makes the 95% intervals of the peak and the last layer not
      overlap, ``(peak - ci_low[peak]) + (ci_high[last] - last)``, when intervals are present;
    - ``seeds``: the half-width of the 95% t-interval of the mean per-seed drop
      (``t(0.975, k-1) * sd / sqrt(k)``), when there are k >= 2 seeds.

    ``significant`` is ``drop > uncertainty``; it is False when the drop is 0 and missing (NA)
    when neither intervals nor seeds are available. ``basis`` names what was used. The peak is
    picked on the same split it is reported on, which favours the peak a little: read small
    significant drops with care.
    """
    split = split or default_split(results)
    rows = probe_rows(results, split, metric)
    if rows.empty:
        raise ProbekitError(f"no probe results with split={split!r} and metric={metric!r}")
    records = []
    for key, crow in rows.groupby(list(CURVE), dropna=False, sort=False):
        per_seed = _per_seed_curve(crow)
        mean = per_seed.mean(axis=1)
        ci = crow.groupby("layer")[["ci_low", "ci_high"]].mean()
        peak_layer, last_layer = int(mean.idxmax()), int(mean.index.max())
        peak, last = float(mean[peak_layer]), float(mean[last_layer])
        drop = peak - last
        bounds, basis = [], []
        lo, hi = ci.at[peak_layer, "ci_low"], ci.at[last_layer, "ci_high"]
        if pd.notna(lo) and pd.notna(hi):
            bounds.append(float((peak - lo) + (hi - last)))
            basis.append("wilson")
        seed_drops = (per_seed.loc[peak_layer] - per_seed.loc[last_layer]).dropna()
        k = len(seed_drops)
        if k >= 2:
            from scipy import stats  # only here: scipy.stats costs every command 60 MB

            bounds.append(float(stats.t.ppf(0.975, k - 1) * seed_drops.std(ddof=1) / np.sqrt(k)))
            basis.append("seeds")
        uncertainty = max(bounds) if bounds else np.nan
        significant: bool | None = False if drop <= 0 else (bool(drop > uncertainty) if bounds else None)
        records.append(
            {
                **dict(zip(CURVE, key, strict=True)),
                "split": split,
                "metric": metric,
                "layers": last_layer,
                "peak_layer": peak_layer,
                "peak": peak,
                "last": last,
                "drop": drop,
                "uncertainty": uncertainty,
                "basis": "+".join(basis) or "none",
                "significant": significant,
                "seeds": per_seed.shape[1],
                "n": crow["n"].max(),
            }
        )
    out = pd.DataFrame.from_records(records)
    out["significant"] = out["significant"].astype("boolean")
    return out


def finetune_tasks_of(results: pd.DataFrame, finetune_tasks: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{model: fine-tuning task}`` from the argument, else the ``finetune_task`` column; never from names."""
    found: dict[str, str] = {}
    if "finetune_task" in results.columns:
        per_model = results.dropna(subset=["finetune_task"]).groupby("model")["finetune_task"].unique()
        for model, tasks in per_model.items():
            if len(tasks) > 1:
                raise ProbekitError(f"model {model!r} has several finetune_task values {sorted(tasks)}")
            found[str(model)] = str(tasks[0])
    found.update(finetune_tasks or {})
    return found


def _identities(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[["task", *DATA_IDENTITY]].drop_duplicates()


def _describe(identity: pd.Series) -> str:
    return ", ".join(f"{c}={_label(identity[c])}" for c in DATA_IDENTITY)


def deltas(
    finetuned: pd.DataFrame,
    pretrained: pd.DataFrame,
    finetune_tasks: Mapping[str, str] | None = None,
    split: str | None = None,
    metric: str = "acc",
) -> pd.DataFrame:
    """Per fine-tuned model, layer and task: fine-tuned minus pre-trained probe score.

    ``pretrained`` holds one model (the baseline); rows of that model in ``finetuned`` are
    ignored. Scores are matched on task, layer, probe, pooling, ``max_length``, data
    (``data_sha256``) and seed: the delta is computed per common seed and then averaged
    (``delta_sd`` is its spread over seeds). Tasks present on one side only are left out.
    Raises :class:`ProbekitError` when a task of a fine-tuned model was probed with a probe,
    pooling, ``max_length`` or data the baseline lacks, when their layers or seeds differ, or
    when nothing is left to compare.

    ``finetune_task`` (the task each model was fine-tuned on) comes from ``finetune_tasks``
    (``{model: task}``) or a ``finetune_task`` column; it is missing (NaN) otherwise.
    """
    split = split or default_split(pretrained)
    base = probe_rows(pretrained, split, metric)
    if base.empty:
        raise ProbekitError(f"the baseline has no probe results with split={split!r} and metric={metric!r}")
    base_models = sorted(base["model"].unique())
    if len(base_models) != 1:
        raise ProbekitError(f"the baseline must hold one model, not {len(base_models)} ({', '.join(base_models)})")
    base_model = base_models[0]
    ft = probe_rows(finetuned, split, metric)
    ft = ft[ft["model"] != base_model]
    if ft.empty:
        raise ProbekitError(
            f"no fine-tuned probe results (split={split!r}, metric={metric!r}) other than the baseline {base_model!r}"
        )
    ft_task = finetune_tasks_of(finetuned, finetune_tasks)
    base_ident = _identities(base)
    base_tasks = set(base["task"])
    frames = []
    for model, rows in ft.groupby("model", sort=False):
        rows = rows[rows["task"].isin(base_tasks)]
        if rows.empty:
            continue
        merged = _identities(rows).merge(base_ident, how="left", indicator=True)
        missing = merged[merged["_merge"] == "left_only"]
        if len(missing):
            bad = missing.iloc[0]
            have = base_ident[base_ident["task"] == bad["task"]].iloc[0]
            raise ProbekitError(
                f"cannot compare {model!r} with baseline {base_model!r} on task {bad['task']!r}: "
                f"fine-tuned results were made with {_describe(bad)} but the baseline with {_describe(have)}"
            )
        frames.append(_model_deltas(str(model), rows, base, base_model))
    if not frames:
        raise ProbekitError(f"the fine-tuned results share no task with the baseline {base_model!r}")
    out = pd.concat(frames, ignore_index=True)
    out.insert(1, "finetune_task", out["model"].map(ft_task))
    out.insert(2, "baseline", base_model)
    out["split"], out["metric"] = split, metric
    return out


def _model_deltas(model: str, rows: pd.DataFrame, base: pd.DataFrame, base_model: str) -> pd.DataFrame:
    keys = ["task", *DATA_IDENTITY, "layer"]
    for (task, *ident), one in rows.groupby(keys[:-1], dropna=False):
        match = same(base["task"], task)
        for column, value in zip(DATA_IDENTITY, ident, strict=True):
            match &= same(base[column], value)
        other = base[match]  # the baseline's rows of this task made with the same probe, pooling and data
        if set(one["layer"]) != set(other["layer"]):
            raise ProbekitError(
                f"cannot compare {model!r} with baseline {base_model!r} on task {task!r}: layers "
                f"{sorted(set(one['layer']))} vs {sorted(set(other['layer']))} (not the same architecture)"
            )
        seeds_ft, seeds_base = set(one["seed"].fillna(-1)), set(other["seed"].fillna(-1))
        if not seeds_ft & seeds_base:
            raise ProbekitError(
                f"cannot compare {model!r} with baseline {base_model!r} on task {task!r}: no common probe seed "
                f"({sorted(map(_label, one['seed'].unique()))} vs {sorted(map(_label, other['seed'].unique()))})"
            )
    ft_vals = rows.assign(seed=rows["seed"].fillna(-1)).groupby([*keys, "seed"], dropna=False)["value"].mean()
    base_vals = base.assign(seed=base["seed"].fillna(-1)).groupby([*keys, "seed"], dropna=False)["value"].mean()
    paired = pd.concat({"finetuned": ft_vals, "pretrained": base_vals}, axis=1, join="inner")
    paired["delta"] = paired["finetuned"] - paired["pretrained"]
    out = paired.groupby(keys, dropna=False).agg(
        finetuned=("finetuned", "mean"),
        pretrained=("pretrained", "mean"),
        delta=("delta", "mean"),
        delta_sd=("delta", "std"),
        seeds=("delta", "size"),
    )
    order = {t: i for i, t in enumerate(pd.unique(rows["task"]))}  # the tasks' order in the results
    out = out.reset_index().sort_values("task", key=lambda s: s.map(order), kind="stable", ignore_index=True)
    out.insert(0, "model", model)
    return out


def top_layers(layers: Sequence[int] | pd.Series, top: int) -> list[int]:
    """The ``top`` highest layers among ``layers`` (all of them if there are fewer)."""
    return sorted(set(int(x) for x in layers))[-top:]


def top_mean(deltas_table: pd.DataFrame, top: int) -> pd.DataFrame:
    """Per model, probing task, probe and pooling: the mean delta over the model's ``top`` highest layers.

    ``layer`` is set to the label ``"top k"``.
    """
    if top < 1:
        raise ProbekitError(f"top must be at least 1, not {top}")
    keys = ["model", "finetune_task", "task", "probe", "pool"]
    keep = deltas_table.groupby(["model", "task"], dropna=False)["layer"].transform(
        lambda s: s.isin(top_layers(s, top))
    )
    out = deltas_table[keep.astype(bool)].groupby(keys, dropna=False, sort=False)["delta"].mean().reset_index()
    out["layer"] = f"top {top}"
    return out


def finetune_grid(deltas_table: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """Deltas arranged as fine-tuning task x probing task (the layout of Mosbach et al.'s Figure 1).

    Fine-tuned models with the same fine-tuning task (e.g. several fine-tuning seeds) are
    averaged (``models`` says how many). Without ``top`` one row per fine-tuning task, probing
    task and layer; with ``top=k`` the mean over each model's ``k`` highest layers
    (:func:`top_mean`). Models without a known fine-tuning task are left out; an empty table
    means none is known.
    """
    d = deltas_table.dropna(subset=["finetune_task"])
    if top is not None:
        d = top_mean(d, top)
    keys = ["finetune_task", "task", "probe", "pool", "layer"]
    grid = d.groupby(keys, dropna=False).agg(delta=("delta", "mean"), models=("model", "nunique"))
    return grid.reset_index()


def forgetting(deltas_table: pd.DataFrame, methods: Mapping[str, str]) -> pd.DataFrame:
    """Which fine-tuning method forgets least: per method, fine-tuning task, probe, pooling and layer, the mean
    absolute fine-tuned minus pre-trained delta over the probing tasks (and over the method's models of that
    task, e.g. seeds). ``methods``: ``{model: method}``; models without one are left out. Columns: ``method``,
    ``finetune_task``, ``probe``, ``pool``, ``layer``, ``mean_abs_delta``, ``mean_delta``, ``tasks``, ``models``.
    """
    d = deltas_table.assign(method=deltas_table["model"].map(dict(methods)))
    d = d.dropna(subset=["method"]).assign(abs_delta=lambda x: x["delta"].abs())
    keys = ["method", "finetune_task", "probe", "pool", "layer"]
    out = d.groupby(keys, dropna=False, sort=False).agg(
        mean_abs_delta=("abs_delta", "mean"),
        mean_delta=("delta", "mean"),
        tasks=("task", "nunique"),
        models=("model", "nunique"),
    )
    return out.reset_index()

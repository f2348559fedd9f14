"""The report's "which fine-tuning method forgets least" section: shown when the report knows each fine-tuned
model's method (``finetune_methods``, as a suite's ``[compare]`` table with ``probe = true`` gives it) and
at least two methods were probed against the pre-trained baseline."""

from __future__ import annotations

import pandas as pd

from probekit import analysis, plot
from probekit.report.base import Context, FigureItem, Section, TableItem, section


def _pp(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.1f}"


@section("forgetting")
def forgetting(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Per-method deltas per layer, the mean absolute delta per layer (one line per method) and the convexity
    table per method."""
    d = ctx.deltas
    methods = dict(ctx.finetune_methods)
    if d is None or not methods:
        return None
    d = d[d["model"].isin(methods)]
    if d.empty or len({methods[m] for m in d["model"].unique()}) < 2:
        return None
    table = analysis.forgetting(d, methods)
    per = table.groupby(["finetune_task", "method"], sort=False)["mean_abs_delta"].mean().unstack("finetune_task")
    per = per.reindex(columns=list(pd.unique(table["finetune_task"])))
    overall = table.groupby("method", sort=False)["mean_abs_delta"].mean()
    display = per.map(_pp).reset_index()
    display.insert(1, "mean over layers and tasks", display["method"].map(overall.map(_pp)))
    best = per.idxmin()  # per fine-tuning task: the method whose probes moved least
    lines = [f"- fine-tuned on {task}: {method} ({_pp(per.loc[method, task])} points)" for task, method in best.items()]
    deltas = d.assign(method=d["model"].map(methods))
    items: list[FigureItem | TableItem] = [
        FigureItem(
            "forgetting",
            plot.forgetting_curves(table),
            "Mean absolute fine-tuned minus pre-trained probe score (points) per layer, over the probing tasks; one "
            "panel per fine-tuning task, one line per method (lower: that layer's probed knowledge changed less).",
        ),
        TableItem(
            "forgetting",
            table,
            "Mean absolute delta (points) per method (rows) and fine-tuning task (columns), over layers and probing "
            "tasks; the CSV holds every layer.",
            display=display,
        ),
        TableItem(
            "method_deltas",
            deltas,
            "Fine-tuned minus pre-trained delta per method, fine-tuning task, layer and probing task (the CSV; the "
            "per-model heatmaps are in the section above).",
            display=deltas.pivot_table(
                index=["finetune_task", "method", "task"], columns="layer", values="delta", sort=False
            )
            .map(_pp)
            .reset_index(),
            max_rows=120,
        ),
    ]
    conv = ctx.convexity
    if conv is not None:
        base = set(ctx.baseline["model"].unique()) if ctx.baseline is not None else set()
        c = conv[conv["model"].isin(set(methods) | base)].copy()
        c["method"] = c["model"].map(lambda m: methods.get(m, "pre-trained"))
        c["finetune_task"] = c["model"].map(lambda m: ctx.finetune_tasks.get(m, "-"))
        cell = c.apply(
            lambda r: (
                f"L{r['peak_layer']}: {_pp(r['peak'])} -> {_pp(r['last'])}{' *' if r['significant'] is True else ''}"
            ),
            axis=1,
        )
        grid = (
            c.assign(cell=cell)
            .pivot_table(index=["finetune_task", "task"], columns="method", values="cell", aggfunc="first", sort=False)
            .fillna("")
            .reset_index()
        )
        items.append(
            TableItem(
                "convexity_by_method",
                c,
                "Convexity per method: peak layer: peak -> last-layer score (%); * = the drop is larger than its "
                "uncertainty. The pre-trained model's curves (fine-tuning task '-') are the reference.",
                display=grid,
                max_rows=120,
            )
        )
    return Section(
        "Which fine-tuning method forgets least?",
        items,
        intro="Each method's checkpoints were extracted and probed like the pre-trained model; the smaller the "
        "absolute change of the probe scores, the less the method moved what the layers encode.",
        summary=["Mean |fine-tuned - pre-trained| (points), least per fine-tuning task:", "", *lines],
    )

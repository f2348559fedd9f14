"""Figures of fine-tuning rows (``source="finetune"``, written by ``probekit finetune``)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from probekit.errors import ProbekitError
from probekit.plot.style import _is_fraction, _panels, _percent_axis, _source, _styled, model_colours


@_styled
def finetune_epochs(results: pd.DataFrame, *, col_wrap: int = 4) -> Figure:
    """Dev score after each epoch of the chosen configuration (batch size, learning rate) of every variant: one
    panel per GLUE task and metric, one colour per variant, mean over seeds."""
    rows = _source(results, "finetune")
    if rows.empty or "epoch" not in rows.columns:
        raise ProbekitError("no fine-tuning results (source='finetune'); run `probekit finetune` first")
    rows = rows.dropna(subset=["epoch"])
    task = "finetune_task" if "finetune_task" in rows.columns else "task"
    chosen = rows[rows["chosen"].astype("boolean").fillna(False).to_numpy()]
    configs = chosen[[task, "mode", "seed", "batch_size", "lr"]].drop_duplicates()
    rows = rows.merge(configs, on=[task, "mode", "seed", "batch_size", "lr"])  # the chosen configurations' epochs
    panels = list(dict.fromkeys(map(tuple, rows[[task, "metric"]].to_numpy())))
    colours = model_colours([str(m) for m in pd.unique(rows["mode"])])
    fig, axes, _ = _panels(len(panels), col_wrap, 3.0, 2.4, extra_h=1.0)
    for ax, (name, metric) in zip(axes, panels, strict=True):
        one = rows[(rows[task] == name) & (rows["metric"] == metric)]
        for mode, line in one.groupby("mode", sort=False):
            curve = line.groupby("epoch")["value"].mean()
            ax.plot(curve.index, curve.to_numpy(), color=colours[str(mode)], marker="o", markersize=3, linewidth=1.7)
        ax.set_title(f"{name} / {metric}")
        ax.set_xlabel("epoch")
        if _is_fraction(one["value"]) and (one["value"] >= 0).all():
            _percent_axis(ax)
    handles = [Line2D([], [], color=c, linewidth=2, label=n) for n, c in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    fig.suptitle("Fine-tuning: dev score per epoch of the chosen configuration")
    return fig

"""The "which fine-tuning method forgets least" figure (:func:`probekit.analysis.forgetting`): the mean
absolute fine-tuned minus pre-trained probe delta per layer, one line per method."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from probekit.errors import ProbekitError
from probekit.plot.style import _is_fraction, _panels, _styled, model_colours


@_styled
def forgetting_curves(table: pd.DataFrame, *, col_wrap: int = 3) -> Figure:
    """Mean absolute delta (points, over the probing tasks) per layer: one panel per fine-tuning task, one line
    per method (lower: the layer's probed knowledge moved less)."""
    if table.empty:
        raise ProbekitError("no fine-tuning method has probe deltas to draw")
    scale = 100.0 if _is_fraction(table["mean_abs_delta"]) else 1.0
    tasks = list(pd.unique(table["finetune_task"].astype(str)))
    colours = model_colours([str(m) for m in pd.unique(table["method"])])
    fig, axes, _ = _panels(len(tasks), col_wrap, 3.2, 2.5, extra_h=1.0)
    for ax, task in zip(axes, tasks, strict=True):
        one = table[table["finetune_task"].astype(str) == task]
        for method, line in one.groupby("method", sort=False):
            curve = line.groupby("layer")["mean_abs_delta"].mean()
            ax.plot(curve.index, scale * curve.to_numpy(), color=colours[str(method)], marker="o", markersize=3)
        ax.set_title(f"fine-tuned on {task}")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean |delta|" + (" (points)" if scale == 100 else ""))
        ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color=c, linewidth=2, label=n) for n, c in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
    fig.suptitle("Which fine-tuning method forgets least: mean |fine-tuned - pre-trained| per layer")
    return fig

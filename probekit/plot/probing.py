"""Figures of probe results (``source="probe"``): the layer x task heatmap and the curves over layers.

Probe figures draw one probe and pooling (``probe=``/``pool=`` choose when the results hold several;
:func:`configs` lists them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from probekit import analysis
from probekit.errors import ProbekitError
from probekit.plot.style import (
    CELL_H,
    CELL_W,
    SEQUENTIAL,
    _heat_axes,
    _is_fraction,
    _ordered,
    _panels,
    _percent_axis,
    _styled,
    _write_cells,
    metric_label,
    model_colours,
    sentence,
)


def configs(results: pd.DataFrame) -> list[tuple[Any, Any]]:
    """The (probe, pool) pairs of the probe rows, in order of appearance."""
    rows = analysis.probe_rows(results)
    return analysis.configs(rows)


def _one_config(table: pd.DataFrame, probe: str | None, pool: str | None) -> pd.DataFrame:
    if probe is not None:
        table = table[analysis.same(table["probe"], probe)]
    if pool is not None:
        table = table[analysis.same(table["pool"], pool)]
    found = analysis.configs(table)
    if not found:
        raise ProbekitError(f"no probe results for probe={probe!r}, pool={pool!r}")
    if len(found) > 1:
        listed = ", ".join(f"{a}/{b}" for a, b in found)
        raise ProbekitError(f"the results hold several probes/poolings ({listed}); pass probe= and pool=")
    return table


@_styled
def heatmap(
    results: pd.DataFrame,
    *,
    split: str | None = None,
    metric: str = "acc",
    models: Sequence[str] | None = None,
    probe: str | None = None,
    pool: str | None = None,
    scale: str = "task",
    col_wrap: int = 3,
) -> Figure:
    """Layer x task heatmap of a probe metric, one panel per model, values in the cells.

    Each task's peak layer is outlined and its value bold. ``scale="task"`` colours each task
    from its lowest to its highest value over all panels (so layer trends show even for tasks
    of very different difficulty; the numbers stay absolute); ``scale="global"`` uses one
    colour scale for all cells.
    """
    split = split or analysis.default_split(results)
    table = _one_config(analysis.seed_summary(results, split, metric), probe, pool)
    if table.empty:
        raise ProbekitError(f"no probe results with split={split!r} and metric={metric!r}")
    models = _ordered(table["model"], models)
    tasks = _ordered(table["task"])
    pct = _is_fraction(table["value"])
    fmt = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.2f}")
    grids = {
        m: table[table["model"] == m].pivot(index="layer", columns="task", values="value").reindex(columns=tasks)
        for m in models
    }
    lo = pd.concat(grids.values()).min()
    hi = pd.concat(grids.values()).max()
    span = (hi - lo).replace(0, 1.0)

    n_layers = max(len(g) for g in grids.values())
    fig, axes, cols = _panels(len(models), col_wrap, len(tasks) * CELL_W + 0.9, n_layers * CELL_H + 1.7, 1.0, 0.5)
    norm = Normalize(0, 1) if scale == "task" else Normalize(float(lo.min()), float(hi.max()))
    for k, (ax, model) in enumerate(zip(axes, models, strict=True)):
        grid = grids[model]
        shown = (grid - lo) / span if scale == "task" else grid
        colours = _heat_axes(ax, shown, SEQUENTIAL, norm)
        peaks = {(grid.index.get_loc(grid[t].idxmax()), j) for j, t in enumerate(tasks) if grid[t].notna().any()}
        for i, j in peaks:
            ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="#f28e2b", linewidth=2.2, clip_on=False))
        _write_cells(ax, grid, colours, fmt, bold=peaks)
        ax.set_title(str(model))
        ax.set_ylabel("layer (0 = embeddings)" if k % cols == 0 else "")
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=SEQUENTIAL)
    cbar = fig.colorbar(mappable, ax=axes, shrink=0.6, aspect=30, pad=0.01)
    if scale == "task":
        cbar.set_ticks([0, 1], labels=["task\nmin", "task\nmax"])
    elif pct:
        cbar.ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))
    cbar.outline.set_visible(False)
    config = table.iloc[0]
    fig.suptitle(
        f"{sentence(metric_label(metric, split))}{' (%)' if pct else ''} by layer and task - "
        f"{config['probe']} probe, {config['pool']} pooling; outlined: each task's peak layer"
    )
    return fig


def _band(ax: Any, x: np.ndarray, curve: pd.DataFrame, colour: Any) -> None:
    if curve["ci_low"].notna().all() and curve["ci_high"].notna().all():
        ax.fill_between(x, curve["ci_low"], curve["ci_high"], color=colour, alpha=0.18, linewidth=0)
    elif (curve["seeds"] > 1).all():
        ax.fill_between(
            x, curve["value"] - curve["sd"], curve["value"] + curve["sd"], color=colour, alpha=0.18, linewidth=0
        )


def band_description(table: pd.DataFrame) -> str:
    """What the bands of :func:`curves` show for this seed summary."""
    if table["ci_low"].notna().all():
        return "bands: 95% Wilson intervals"
    if (table["seeds"] > 1).all():
        return f"bands: +-1 s.d. over {int(table['seeds'].min())} seeds"
    return "no bands: one seed, no intervals"


@_styled
def curves(
    results: pd.DataFrame,
    *,
    split: str | None = None,
    metric: str = "acc",
    models: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    probe: str | None = None,
    pool: str | None = None,
    baselines: bool = True,
    col_wrap: int = 5,
) -> Figure:
    """One panel per task: the metric over layers for each model, with bands and baselines.

    Bands are the 95% Wilson intervals when present, else +-1 s.d. over seeds. With
    ``baselines``, the control task (same probe on shuffled labels; thin dashed, model colour)
    and the majority class (dotted grey) are drawn when the results have them. A dot marks each
    curve's peak.
    """
    split = split or analysis.default_split(results)
    summary = _one_config(analysis.seed_summary(results, split), probe, pool)
    table = summary[summary["metric"] == metric]
    if table.empty:
        raise ProbekitError(f"no probe results with split={split!r} and metric={metric!r}")
    models = _ordered(table["model"], models)
    tasks = _ordered(table["task"], tasks)
    colours = model_colours(models)
    fig, axes, _ = _panels(len(tasks), col_wrap, 2.7, 2.2, sharex=True)
    has_control = has_majority = False
    for ax, task in zip(axes, tasks, strict=True):
        for model in models:
            curve = table[(table["model"] == model) & (table["task"] == task)].sort_values("layer")
            if curve.empty:
                continue
            x = curve["layer"].to_numpy()
            _band(ax, x, curve, colours[model])
            ax.plot(x, curve["value"], color=colours[model], linewidth=1.8, marker="o", markersize=2.5)
            peak = curve.loc[curve["value"].idxmax()]
            ax.plot(
                [peak["layer"]],
                [peak["value"]],
                "o",
                color=colours[model],
                markersize=6.5,
                markeredgecolor="white",
                markeredgewidth=1.0,
                zorder=5,
            )
            control = summary[
                (summary["model"] == model) & (summary["task"] == task) & (summary["metric"] == "control_acc")
            ].sort_values("layer")
            if baselines and metric == "acc" and len(control):
                has_control = True
                ax.plot(
                    control["layer"], control["value"], color=colours[model], linewidth=1.0, linestyle="--", alpha=0.8
                )
        majority = summary[(summary["task"] == task) & (summary["metric"] == "majority_acc")]
        if baselines and metric == "acc" and len(majority):
            has_majority = True
            ax.axhline(majority["value"].mean(), color="#777777", linewidth=1.1, linestyle=":")
        ax.set_title(str(task))
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=7))
        if _is_fraction(table["value"]):
            _percent_axis(ax)
    handles = [Line2D([], [], color=colours[m], linewidth=2, label=str(m)) for m in models]
    if has_control:
        handles.append(Line2D([], [], color="#555555", linewidth=1, linestyle="--", label="control (shuffled labels)"))
    if has_majority:
        handles.append(Line2D([], [], color="#777777", linewidth=1.1, linestyle=":", label="majority class"))
    handles.append(Line2D([], [], color="#555555", marker="o", linestyle="", markersize=6, label="peak"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    config = table.iloc[0]
    fig.suptitle(
        f"{sentence(metric_label(metric, split))} over layers - {config['probe']} probe, "
        f"{config['pool']} pooling; {band_description(table)}"
    )
    return fig

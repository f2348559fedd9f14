"""Figures of fine-tuned minus pre-trained probe scores (:func:`probekit.analysis.deltas`): the delta
heatmap per model and the fine-tuning task x probing task grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from probekit import analysis
from probekit.errors import ProbekitError
from probekit.plot.probing import _one_config
from probekit.plot.style import (
    CELL_H,
    CELL_W,
    DIVERGING,
    _heat_axes,
    _is_fraction,
    _ordered,
    _panels,
    _styled,
    _write_cells,
    metric_label,
    signed,
)


def _delta_limit(values: pd.Series | np.ndarray, limit: float | None) -> float:
    if limit is not None:
        return float(limit)
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    return float(v.max()) if len(v) and v.max() > 0 else 1.0


def _delta_fmt(scale: float) -> Callable[[float], str]:
    return (lambda v: signed(scale * v, 1)) if scale == 100 else (lambda v: signed(v, 2))


def _delta_colourbar(fig: Figure, axes: Any, norm: Normalize, scale: float, baseline: str) -> None:
    cbar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=DIVERGING), ax=axes, shrink=0.6, aspect=30, pad=0.01)
    cbar.ax.yaxis.set_major_formatter(
        mpl.ticker.FuncFormatter(lambda v, _: signed(scale * v, 0) if scale == 100 else signed(v, 2))
    )
    cbar.set_label(f"fine-tuned - {baseline}" + (" (points)" if scale == 100 else ""))
    cbar.outline.set_visible(False)


def _model_title(model: str, finetune_task: Any) -> str:
    return f"{model}\n(fine-tuned on {finetune_task})" if pd.notna(finetune_task) else str(model)


@_styled
def delta_heatmap(
    deltas: pd.DataFrame,
    *,
    models: Sequence[str] | None = None,
    probe: str | None = None,
    pool: str | None = None,
    limit: float | None = None,
    col_wrap: int = 3,
) -> Figure:
    """Layer x task heatmap of fine-tuned minus pre-trained scores (:func:`probekit.analysis.deltas`).

    Diverging palette centred at 0 (green = fine-tuning raised the score, red = lowered it),
    symmetric limits (``limit``, default the largest absolute delta); one panel per model.
    """
    d = _one_config(deltas, probe, pool)
    models = _ordered(d["model"], models)
    tasks = _ordered(d["task"])
    scale = 100.0 if _is_fraction(d["finetuned"]) and _is_fraction(d["pretrained"]) else 1.0
    lim = _delta_limit(d["delta"], limit)
    norm = Normalize(-lim, lim)
    grids = {
        m: d[d["model"] == m].pivot(index="layer", columns="task", values="delta").reindex(columns=tasks)
        for m in models
    }
    n_layers = max(len(g) for g in grids.values())
    fig, axes, cols = _panels(len(models), col_wrap, len(tasks) * CELL_W + 0.9, n_layers * CELL_H + 1.9, 1.2, 0.5)
    ft = d.groupby("model")["finetune_task"].first()
    for k, (ax, model) in enumerate(zip(axes, models, strict=True)):
        grid = grids[model]
        colours = _heat_axes(ax, grid, DIVERGING, norm)
        _write_cells(ax, grid, colours, _delta_fmt(scale))
        ax.set_title(_model_title(model, ft[model]))
        ax.set_ylabel("layer (0 = embeddings)" if k % cols == 0 else "")
    baseline = str(d["baseline"].iloc[0])
    _delta_colourbar(fig, axes, norm, scale, baseline)
    row = d.iloc[0]
    fig.suptitle(
        f"Fine-tuned minus pre-trained ({baseline}) {metric_label(row['metric'], row['split'])}"
        f"{' in points' if scale == 100 else ''} - {row['probe']} probe, {row['pool']} pooling"
    )
    return fig


@_styled
def finetune_grid(
    deltas: pd.DataFrame,
    *,
    top: int | None = None,
    layers: Sequence[int] | None = None,
    probe: str | None = None,
    pool: str | None = None,
    limit: float | None = None,
    col_wrap: int = 3,
) -> Figure:
    """Fine-tuning task x probing task delta heatmaps, as in Mosbach et al. (2020), Figure 1.

    One small heatmap per layer (``layers`` to choose some), or with ``top=k`` one heatmap of
    the mean over the ``k`` highest layers. Models fine-tuned on the same task are averaged.
    Needs the fine-tuning task of each model (see :func:`probekit.analysis.deltas`).
    """
    d = _one_config(deltas, probe, pool)
    grid = analysis.finetune_grid(d, top=top)
    if grid.empty:
        raise ProbekitError(
            "no fine-tuning task is known for these models; pass finetune_tasks={model: task} "
            "to analysis.deltas (or --finetune-task MODEL=TASK to probekit report)"
        )
    if layers is not None and top is None:
        grid = grid[grid["layer"].isin(list(layers))]
    panels = _ordered(grid["layer"])
    ft_tasks = sorted(grid["finetune_task"].unique())
    tasks = _ordered(d["task"])
    scale = 100.0 if _is_fraction(d["finetuned"]) and _is_fraction(d["pretrained"]) else 1.0
    lim = _delta_limit(grid["delta"], limit)
    norm = Normalize(-lim, lim)
    fig, axes, cols = _panels(len(panels), col_wrap, len(tasks) * CELL_W + 1.0, len(ft_tasks) * 0.42 + 0.6, 1.2, 1.5)
    for k, (ax, layer) in enumerate(zip(axes, panels, strict=True)):
        one = grid[grid["layer"] == layer].pivot(index="finetune_task", columns="task", values="delta")
        one = one.reindex(index=ft_tasks, columns=tasks)
        colours = _heat_axes(ax, one, DIVERGING, norm)
        _write_cells(ax, one, colours, _delta_fmt(scale), fontsize=6.5 if top is None else 7.5)
        ax.set_title(f"layer {layer}" if top is None else f"mean over the {top} highest layers")
        ax.set_ylabel("fine-tuned on" if k % cols == 0 else "")
        if k % cols:
            ax.set_yticklabels([])
        if k + cols < len(panels):  # a panel below shows the task names
            ax.set_xticklabels([])
    _delta_colourbar(fig, axes, norm, scale, str(d["baseline"].iloc[0]))
    row = d.iloc[0]
    fig.suptitle(
        f"Fine-tuning task x probing task: change in {metric_label(row['metric'], row['split'])} - "
        f"{row['probe']} probe, {row['pool']} pooling"
    )
    return fig

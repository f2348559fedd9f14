"""Figures of results tables; every function returns a :class:`matplotlib.figure.Figure`.

Figures are built without pyplot (no global state, no double display in notebooks, safe
under the Agg backend) and share one style: one colour per model, accuracies in percent,
values written in heatmap cells::

    from probekit import analysis, plot
    plot.heatmap(results)                              # layer x task, one panel per model
    plot.curves(results)                               # per task, with bands and baselines
    plot.delta_heatmap(analysis.deltas(ft, pt))        # fine-tuned - pre-trained, 0 = yellow
    plot.finetune_grid(analysis.deltas(ft, pt), top=4) # fine-tuning task x probing task

Probe figures draw one probe and pooling (``probe=``/``pool=`` choose when the results hold
several; :func:`configs` lists them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from probekit import analysis
from probekit.errors import ProbekitError
from probekit.io import atomic_path

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "svg.fonttype": "none",
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
}
SEQUENTIAL = "mako_r"
DIVERGING = "RdYlGn"  # positive green, negative red, 0 pale yellow
CELL_W, CELL_H = 0.5, 0.3  # inches per heatmap cell

P = ParamSpec("P")


def save(fig: Figure, path: str | Path, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) atomically, with the house style's
    saving settings (tight box, 150 dpi, SVG text kept as text); ``kwargs`` go to ``savefig``."""
    path = Path(path)
    with mpl.rc_context(STYLE), atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs)
    return path


def _styled(fn: Callable[P, Figure]) -> Callable[P, Figure]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer for text extents, whatever pyplot's backend is
    return fig


def _panels(
    n: int, col_wrap: int, panel_w: float, panel_h: float, extra_w: float = 0.3, extra_h: float = 0.9, **kw: Any
) -> tuple[Figure, list[Any], int]:
    """A figure of ``n`` panels of ``panel_w`` x ``panel_h`` inches, at most ``col_wrap`` per row, rows balanced.

    Returns the figure, the ``n`` axes (row by row) and the number of columns.
    """
    rows = math.ceil(n / max(1, col_wrap))
    cols = math.ceil(n / rows)
    fig = _figure(cols * panel_w + extra_w, rows * panel_h + extra_h)
    axes = fig.subplots(rows, cols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n]), cols


def _ordered(values: Sequence[Any] | pd.Series, wanted: Sequence[str] | None = None) -> list[Any]:
    present = list(pd.unique(pd.Series(values)))
    if wanted is None:
        return present
    missing = [w for w in wanted if w not in present]
    if missing:
        raise ProbekitError(f"{', '.join(map(str, missing))} not in the results (have {', '.join(map(str, present))})")
    return list(wanted)


def model_colours(models: Sequence[str]) -> dict[str, Any]:
    """One colour per model, stable for a given model order."""
    palette = sns.color_palette("colorblind", max(len(models), 1))
    return {m: palette[i % len(palette)] for i, m in enumerate(models)}


def _is_fraction(values: pd.Series | np.ndarray) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(len(v)) and bool(np.all(np.abs(v) <= 1.0))


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


def _text_colour(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "#1a1a1a"


def _write_cells(
    ax: Any,
    values: pd.DataFrame,
    colours: np.ndarray,
    fmt: Callable[[float], str],
    bold: set[tuple[int, int]] | None = None,
    fontsize: float = 7,
) -> None:
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values.iat[i, j]
            if pd.isna(v):
                continue
            strong = bold is not None and (i, j) in bold
            ax.text(
                j + 0.5,
                i + 0.5,
                fmt(v),
                ha="center",
                va="center",
                fontsize=fontsize,
                color=_text_colour(colours[i, j]),
                fontweight="bold" if strong else "normal",
            )


def _heat_axes(ax: Any, table: pd.DataFrame, cmap: str, norm: Normalize) -> np.ndarray:
    """Draw ``table`` (rows = y, top to bottom; columns = x) as coloured cells; return the cells' RGBA colours.

    (``seaborn.heatmap`` draws the whole figure on every call, quadratic in the number of panels.)
    """
    values = np.ma.masked_invalid(table.to_numpy(dtype=float))
    ax.pcolormesh(values, cmap=cmap, norm=norm, edgecolors="white", linewidth=0.6)
    ax.set_xlim(0, values.shape[1])
    ax.set_ylim(values.shape[0], 0)
    ax.set_xticks(
        np.arange(values.shape[1]) + 0.5,
        [str(c) for c in table.columns],
        rotation=40,
        ha="right",
        rotation_mode="anchor",
    )
    ax.set_yticks(np.arange(values.shape[0]) + 0.5, [str(i) for i in table.index])
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return mpl.colormaps[cmap](norm(values.filled(np.nan)))


METRIC_NAMES = {
    "acc": "probe accuracy",
    "control_acc": "control-task accuracy",
    "selectivity": "selectivity",
    "majority_acc": "majority-class accuracy",
}


def metric_label(metric: str, split: str | None = None) -> str:
    """'probe accuracy (test)' for titles and captions."""
    name = METRIC_NAMES.get(metric, metric)
    return f"{name} ({split})" if split else name


def sentence(text: str) -> str:
    """``text`` with its first letter upper-cased (unlike ``str.capitalize``, the rest is kept)."""
    return text[:1].upper() + text[1:]


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


def _percent_axis(ax: Any) -> None:
    ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))


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


def _delta_limit(values: pd.Series | np.ndarray, limit: float | None) -> float:
    if limit is not None:
        return float(limit)
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    return float(v.max()) if len(v) and v.max() > 0 else 1.0


def signed(value: float, digits: int = 1) -> str:
    """``+1.2`` / ``-0.4`` / ``0.0`` (never ``-0.0``); empty for a missing value."""
    if pd.isna(value):
        return ""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


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


def _source(results: pd.DataFrame, source: str) -> pd.DataFrame:
    if "source" not in results.columns:
        return results.iloc[0:0]
    return results[results["source"] == source]


def _line_panels(
    table: pd.DataFrame,
    panel_keys: list[str],
    line_keys: list[str],
    style_key: str | None,
    title: str,
    xlabel: str,
    col_wrap: int = 4,
) -> Figure:
    """Small multiples of value over layer: one panel per ``panel_keys``, one colour per ``line_keys``."""
    table = table.assign(value=pd.to_numeric(table["value"]), layer=pd.to_numeric(table["layer"]))
    panels = list(dict.fromkeys(map(tuple, table[panel_keys].to_numpy())))
    lines = list(dict.fromkeys(map(tuple, table[line_keys].to_numpy())))
    styles = list(pd.unique(table[style_key])) if style_key else [None]
    colours = model_colours([" / ".join(map(str, x)) for x in lines])
    dashes = ["-", "--", ":", "-."]
    fig, axes, _ = _panels(len(panels), col_wrap, 2.9, 2.3, extra_h=1.0, sharex=True)
    for ax, panel in zip(axes, panels, strict=True):
        in_panel = table[(table[panel_keys] == pd.Series(panel, index=panel_keys)).all(axis=1)]
        for line in lines:
            name = " / ".join(map(str, line))
            for s, style in enumerate(styles):
                one = in_panel[(in_panel[line_keys] == pd.Series(line, index=line_keys)).all(axis=1)]
                if style_key:
                    one = one[one[style_key] == style]
                one = one.groupby("layer")["value"].agg(["mean", "std", "size"]).reset_index()
                if one.empty:
                    continue
                ax.plot(
                    one["layer"],
                    one["mean"],
                    color=colours[name],
                    linestyle=dashes[s % 4],
                    linewidth=1.7,
                    marker="o",
                    markersize=2.5,
                )
                if (one["size"] > 1).all():
                    ax.fill_between(
                        one["layer"],
                        one["mean"] - one["std"],
                        one["mean"] + one["std"],
                        color=colours[name],
                        alpha=0.18,
                        linewidth=0,
                    )
        ax.set_title(" / ".join(map(str, panel)))
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=7))
        if _is_fraction(in_panel["value"]) and (in_panel["value"] >= 0).all():
            _percent_axis(ax)
    handles = [Line2D([], [], color=colours[n], linewidth=2, label=n) for n in colours]
    if style_key and len(styles) > 1:
        handles += [
            Line2D([], [], color="#555555", linestyle=dashes[i % 4], label=str(s)) for i, s in enumerate(styles)
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    fig.suptitle(title)
    return fig


@_styled
def mlm_curves(results: pd.DataFrame, *, col_wrap: int = 4) -> Figure:
    """MLM-head probe accuracy over layers (``source="mlm-probe"``): one panel per data set, one colour per
    model, solid = top-1, dashed = top-5."""
    rows = _source(results, "mlm-probe")
    if rows.empty:
        raise ProbekitError("no MLM-head probe results (source='mlm-probe'); run `probekit mlm-probe` first")
    rows = rows.assign(metric=rows["metric"].map({"mlm_acc": "top-1", "mlm_top5": "top-5"}).fillna(rows["metric"]))
    return _line_panels(
        rows,
        ["task"],
        ["model"],
        "metric",
        "MLM-head probe: accuracy of a head trained on each layer at naming the (unmasked) input token",
        "layer",
        col_wrap,
    )


@_styled
def offramp_curves(results: pd.DataFrame, *, col_wrap: int = 4) -> Figure:
    """Off-ramp quality at each forced exit layer (``source="offramp"``): one panel per task and metric, one
    colour per model and training mode; bands +-1 s.d. over seeds."""
    rows = _source(results, "offramp")
    if rows.empty:
        raise ProbekitError("no off-ramp results (source='offramp'); run `probekit offramp` first")
    return _line_panels(
        rows,
        ["task", "metric"],
        ["model", "probe"],
        None,
        "Off-ramps: quality when every example exits at a given layer",
        "exit layer",
        col_wrap,
    )


def _policy_rows(results: pd.DataFrame) -> pd.DataFrame:
    rows = _source(results, "exit-policy")
    if rows.empty:
        raise ProbekitError("no exit-policy results (source='exit-policy'); run `probekit offramp` first")
    return rows


@_styled
def quality_vs_saving(results: pd.DataFrame, *, saving: str = "expected_saving", col_wrap: int = 3) -> Figure:
    """Quality against compute saving for every exit policy (one line per policy over its thresholds), one
    panel per model, task and metric; the dashed line is the full model (off-ramp at the last layer)."""
    rows = _policy_rows(results)
    rows = rows[rows["metric"] != "exit_fraction"].dropna(subset=[saving])
    if rows.empty:
        raise ProbekitError(f"no exit-policy quality rows with {saving}")
    full = _source(results, "offramp")
    panels = list(dict.fromkeys(map(tuple, rows[["model", "task", "metric"]].to_numpy())))
    policies = list(pd.unique(rows["policy"]))
    colours = model_colours(policies)
    fig, axes, _ = _panels(len(panels), col_wrap, 3.4, 2.8)
    for ax, (model, task, metric) in zip(axes, panels, strict=True):
        one = rows[(rows["model"] == model) & (rows["task"] == task) & (rows["metric"] == metric)]
        for (policy, mode), line in one.groupby(["policy", "probe"], dropna=False, sort=False):
            line = line.groupby("threshold", dropna=False)[[saving, "value"]].mean().sort_values(saving)
            ax.plot(
                line[saving],
                line["value"],
                marker="o",
                markersize=3.5,
                linewidth=1.6,
                color=colours[policy],
                label=f"{policy} ({mode})" if pd.notna(mode) else str(policy),
            )
        ref = full[(full["model"] == model) & (full["task"] == task) & (full["metric"] == metric)]
        if len(ref):
            last = ref[pd.to_numeric(ref["layer"]) == pd.to_numeric(ref["layer"]).max()]
            ax.axhline(pd.to_numeric(last["value"]).mean(), color="#777777", linestyle="--", linewidth=1.1)
        ax.set_title(f"{model} / {task}")
        ax.set_xlabel("expected compute saving" if saving == "expected_saving" else "measured compute saving")
        ax.set_ylabel(str(metric))
        ax.xaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))
        if _is_fraction(one["value"]) and (pd.to_numeric(one["value"]) >= 0).all():
            _percent_axis(ax)
        ax.legend(frameon=False, loc="lower left")
    fig.suptitle("Early exit: quality against compute saving for each policy (dashed: full model)")
    return fig


def _threshold_name(rows: pd.DataFrame) -> str:
    names = rows["threshold_name"].dropna() if "threshold_name" in rows else pd.Series(dtype=object)
    return str(names.iloc[0]) if len(names) else "threshold"


@_styled
def exit_histograms(results: pd.DataFrame, *, max_thresholds: int = 4, col_wrap: int = 4) -> Figure:
    """Fraction of examples leaving at each layer (``metric="exit_fraction"``), one panel per model, task and
    policy, one line per threshold (at most ``max_thresholds``, evenly spread)."""
    rows = _policy_rows(results)
    rows = rows[rows["metric"] == "exit_fraction"]
    if rows.empty:
        raise ProbekitError("no exit histograms (exit-policy rows with metric='exit_fraction')")
    rows = rows.assign(layer=pd.to_numeric(rows["layer"]), value=pd.to_numeric(rows["value"]))
    panels = list(dict.fromkeys(map(tuple, rows[["model", "task", "policy"]].to_numpy())))
    fig, axes, _ = _panels(len(panels), col_wrap, 2.9, 2.4, extra_h=0.6, sharex=True)
    for ax, (model, task, policy) in zip(axes, panels, strict=True):
        one = rows[(rows["model"] == model) & (rows["task"] == task) & (rows["policy"] == policy)]
        thresholds = sorted(one["threshold"].dropna().unique())
        if len(thresholds) > max_thresholds:
            idx = np.linspace(0, len(thresholds) - 1, max_thresholds).round().astype(int)
            thresholds = [thresholds[i] for i in sorted(set(idx))]
        palette = sns.color_palette("flare", len(thresholds))
        for colour, t in zip(palette, thresholds, strict=True):
            hist = one[one["threshold"] == t].groupby("layer")["value"].mean()
            ax.plot(
                hist.index,
                hist.to_numpy(),
                marker="o",
                markersize=3,
                linewidth=1.5,
                color=colour,
                label=f"{_threshold_name(one)} {t:g}",
            )
        ax.set_title(f"{model} / {task}\n{policy}")
        ax.set_xlabel("exit layer")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=7))
        _percent_axis(ax)
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle("Early exit: fraction of examples leaving at each layer")
    return fig


@_styled
def saving_calibration(results: pd.DataFrame) -> Figure:
    """Expected (from exit layers) against measured (timed) compute saving, one colour per policy."""
    rows = _policy_rows(results)
    if "measured_saving" not in rows.columns or rows["measured_saving"].isna().all():
        raise ProbekitError("no measured savings in the exit-policy results (run the timing step)")
    # the expected saving of the timed examples when the run recorded it; one point per policy and threshold
    x = (
        "expected_saving_timed"
        if "expected_saving_timed" in rows and rows["expected_saving_timed"].notna().any()
        else ("expected_saving")
    )
    rows = rows[rows["metric"] != "exit_fraction"].dropna(subset=[x, "measured_saving"])
    rows = rows.drop_duplicates(subset=[c for c in ("model", "task", "probe", "policy", "threshold") if c in rows])
    policies = list(pd.unique(rows["policy"]))
    colours = model_colours(policies)
    fig = _figure(4.6, 4.0)
    ax = fig.subplots()
    for policy in policies:
        one = rows[rows["policy"] == policy]
        ax.scatter(
            one[x],
            one["measured_saving"],
            s=22,
            color=colours[policy],
            label=str(policy),
            alpha=0.85,
            edgecolor="white",
            linewidth=0.5,
        )
    hi = float(np.nanmax(rows[[x, "measured_saving"]].to_numpy(dtype=float))) * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], color="#777777", linestyle="--", linewidth=1, label="measured = expected")
    ax.set_xlabel("expected saving (from exit layers)")
    ax.set_ylabel("measured saving (wall clock)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))
    ax.legend(frameon=False)
    ax.set_title("Early exit: expected vs measured compute saving")
    return fig

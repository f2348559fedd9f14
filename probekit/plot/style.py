"""The house style of every probekit figure and the drawing helpers the figure modules share.

Figures are built without pyplot (no global state, no double display in notebooks, safe under the
Agg backend) and share one style: one colour per model, accuracies in percent, values written in
heatmap cells. :func:`save` writes a figure with the style's saving settings.
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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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


def _seaborn() -> Any:
    """seaborn, imported when a figure is drawn, not when probekit is: it loads scipy (150 MB for every command).
    Importing it also registers the colormap ``SEQUENTIAL`` names (mako_r)."""
    import seaborn  # deferred: heavy (scipy), and only figures need it

    return seaborn


def _styled(fn: Callable[P, Figure]) -> Callable[P, Figure]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        _seaborn()  # its colormaps, before the figure names them
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
    palette = _seaborn().color_palette("colorblind", max(len(models), 1))
    return {m: palette[i % len(palette)] for i, m in enumerate(models)}


def _is_fraction(values: pd.Series | np.ndarray) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(len(v)) and bool(np.all(np.abs(v) <= 1.0))


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
    "control_gap": "accuracy minus shuffled-label control",
    "compression": "MDL compression (uniform / online codelength)",
    "codelength": "online codelength (bits)",
    "majority_acc": "majority-class accuracy",
}


def metric_label(metric: str, split: str | None = None) -> str:
    """'probe accuracy (test)' for titles and captions."""
    name = METRIC_NAMES.get(metric, metric)
    return f"{name} ({split})" if split else name


def sentence(text: str) -> str:
    """``text`` with its first letter upper-cased (unlike ``str.capitalize``, the rest is kept)."""
    return text[:1].upper() + text[1:]


def _percent_axis(ax: Any) -> None:
    ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))


def signed(value: float, digits: int = 1) -> str:
    """``+1.2`` / ``-0.4`` / ``0.0`` (never ``-0.0``); empty for a missing value."""
    if pd.isna(value):
        return ""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


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

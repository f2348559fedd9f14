"""Figures of off-ramp and exit-policy results (``source="offramp"`` / ``"exit-policy"``).

``probekit report`` shows them in its off-ramp section; :func:`save_figures` writes them as PNG files
for a README or a paper: the metric by forced exit layer, quality against expected saving for all
policies on one plot, the exit histograms, and (when the run was timed) expected against measured saving.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from probekit.errors import ProbekitError
from probekit.plot.style import (
    _figure,
    _is_fraction,
    _line_panels,
    _panels,
    _percent_axis,
    _seaborn,
    _source,
    _styled,
    model_colours,
    save,
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
        ["model", "mode"],
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
        for (policy, mode), line in one.groupby(["policy", "mode"], dropna=False, sort=False):
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
        palette = _seaborn().color_palette("flare", len(thresholds))
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
    rows = rows.drop_duplicates(subset=[c for c in ("model", "task", "mode", "policy", "threshold") if c in rows])
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


@_styled
def methods_vs_saving(results: pd.DataFrame, *, saving: str = "expected_saving", col_wrap: int = 3) -> Figure:
    """Quality against compute saving for every training method on one figure (one panel per model and task):
    each method with its paper's exit policy over its thresholds, mean over seeds with +-1 s.d. error bars;
    the ring marks the threshold chosen on the held-out split, the dashed line each method's full model."""
    rows = _policy_rows(results)
    rows = rows[rows["metric"] != "exit_fraction"].dropna(subset=[saving])
    if "native" in rows:
        rows = rows[rows["native"].fillna(False).astype(bool)]
    if rows.empty:
        raise ProbekitError(f"no exit-policy rows of the methods' own policies with {saving}")
    metric_order = [m for m in ("acc", "mcc", "f1", "pearson", "spearman") if (rows["metric"] == m).any()]
    metric = metric_order[0] if metric_order else str(rows["metric"].iloc[0])
    rows = rows[rows["metric"] == metric]
    panels = list(dict.fromkeys(map(tuple, rows[["model", "task"]].to_numpy())))
    modes = list(dict.fromkeys(map(tuple, rows[["mode", "policy"]].to_numpy())))
    colours = model_colours(modes)
    fig, axes, _ = _panels(len(panels), col_wrap, 3.8, 3.0)
    for ax, (model, task) in zip(axes, panels, strict=True):
        one = rows[(rows["model"] == model) & (rows["task"] == task)]
        for (mode, _policy), line in one.groupby(["mode", "policy"], sort=False):
            agg = line.groupby("threshold")[[saving, "value"]].agg(["mean", "std"]).sort_values((saving, "mean"))
            ax.errorbar(
                agg[(saving, "mean")],
                agg[("value", "mean")],
                yerr=agg[("value", "std")].fillna(0.0),
                marker="o",
                markersize=3.5,
                linewidth=1.5,
                capsize=2,
                color=colours[(mode, _policy)],
                label=f"{mode} ({_policy})",
            )
            if "chosen" in line:
                pick = line[line["chosen"].fillna(False).astype(bool)]
                if len(pick):
                    ax.scatter(
                        [pick[saving].mean()],
                        [pick["value"].mean()],
                        s=70,
                        facecolors="none",
                        edgecolors=colours[(mode, _policy)],
                        linewidths=1.5,
                    )
        ax.set_title(f"{model} / {task}")
        ax.set_xlabel("expected compute saving" if saving == "expected_saving" else "measured compute saving")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))
        ax.legend(frameon=False, fontsize=7, loc="lower left")
    fig.suptitle("Early-exit methods: quality against compute saving (ring: threshold chosen on held-out)")
    return fig


def save_figures(results: pd.DataFrame, out: str | Path, stem: str = "offramp", dpi: int = 130) -> list[Path]:
    """Write ``out/<stem>_{layers,tradeoff,exits[,savings][,methods]}.png`` from an off-ramp results table
    (``methods``: the comparison of several training methods)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Callable[[pd.DataFrame], Figure]] = {
        "layers": offramp_curves,
        "tradeoff": quality_vs_saving,
        "exits": exit_histograms,
    }
    if "measured_saving" in results and results["measured_saving"].notna().any():
        figures["savings"] = saving_calibration
    if results["mode"].nunique() > 1:
        figures["methods"] = methods_vs_saving
    paths = []
    for name, draw in figures.items():
        fig = draw(results)
        path = out / f"{stem}_{name}.png"
        save(fig, path, dpi=dpi)
        paths.append(path)
    return paths

"""The layer x task table that ``probekit probe`` prints: test accuracy per layer, with the
shuffled-label control beside it and the majority class underneath, averaged over seeds."""

from __future__ import annotations

import pandas as pd

from probekit.data.registry import short_name


def _cell(values: pd.Series) -> str:
    mean = 100 * values.mean()
    if len(values) > 1:
        return f"{mean:.1f}±{100 * values.std():.1f}"
    return f"{mean:.1f}"


def layer_table(results: pd.DataFrame, split: str = "test") -> list[dict[str, str]]:
    """Rows (one per layer, then ``majority``) of ``probe / control`` accuracy in percent per
    task column (the paper's short task names; ``model/task`` when there are several models);
    mean±sd over seeds."""
    rows = results[(results["source"] == "probe") & (results["split"] == split)]
    several = rows["model"].nunique() > 1
    task = rows["task"].map(short_name)
    rows = rows.assign(column=rows["model"] + "/" + task if several else task)
    columns = list(dict.fromkeys(rows["column"]))
    table: dict[int, dict[str, str]] = {}
    for (column, layer), group in rows.groupby(["column", "layer"], sort=True):
        by_metric = {m: g["value"] for m, g in group.groupby("metric")}
        cell = _cell(by_metric["acc"]) if "acc" in by_metric else "-"
        if "control_acc" in by_metric:
            cell += f"/{_cell(by_metric['control_acc'])}"
        table.setdefault(int(layer), {"layer": str(int(layer))})[column] = cell
    out = [{"layer": r["layer"], **{c: r.get(c, "-") for c in columns}} for _, r in sorted(table.items())]
    majority = {
        c: _cell(rows[(rows["column"] == c) & (rows["metric"] == "majority_acc")].drop_duplicates(["seed"])["value"])
        for c in columns
    }
    out.append({"layer": "majority", **majority})
    return out


def table_title(results: pd.DataFrame, split: str = "test") -> str:
    probes = ", ".join(sorted(results["probe"].dropna().unique()))
    seeds = results["seed"].nunique()
    control = " / shuffled-label control" if (results["metric"] == "control_acc").any() else ""
    spread = ", mean±sd over seeds" if seeds > 1 else ""
    return f"{split} accuracy % ({probes} probe{control}; {seeds} seed(s){spread})"

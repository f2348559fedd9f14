"""The layer x task table that ``probekit probe`` prints: test accuracy per layer, with the
shuffled-label control beside it and the majority class underneath, averaged over seeds."""

from __future__ import annotations

import pandas as pd

from probekit.data import short_name


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
    label = ", ".join(sorted(results["probe"].dropna().unique())) + " probe"
    if "protocol" in results.columns and results["protocol"].notna().any():
        label += ", protocol " + ", ".join(sorted(results["protocol"].dropna().unique()))
    seeds = results["seed"].nunique()
    control = " / shuffled-label control" if (results["metric"] == "control_acc").any() else ""
    spread = ", mean±sd over seeds" if seeds > 1 else ""
    return f"{split} accuracy % ({label}{control}; {seeds} seed(s){spread})"


def task_table(results: pd.DataFrame, split: str = "test") -> list[dict[str, str]]:
    """The same cells as :func:`layer_table` turned around: one row per task (short names), one column per
    layer, then ``majority``; this is the shape that fits a terminal, since tasks outnumber layers less often
    than their names outgrow a column."""
    by_layer = layer_table(results, split)
    tasks = [c for c in by_layer[0] if c != "layer"]
    out = []
    for task in tasks:
        out.append({"task": task, **{r["layer"]: r[task] for r in by_layer}})
    return out


COLUMN_OVERHEAD = 3
"""Characters a table column takes besides its text (a space each side and one rule), as rich draws it."""


def fit_width(rows: list[dict[str, str]], width: int, keep: int = 1) -> list[list[dict[str, str]]]:
    """``rows`` cut into tables of the same rows and consecutive columns, each at most ``width`` characters
    wide when drawn (every table repeats the first ``keep`` columns: the row names). Cells are never cut."""
    if not rows:
        return []
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    fixed, rest = columns[:keep], columns[keep:]
    base = 1 + sum(widths[c] + COLUMN_OVERHEAD for c in fixed)
    groups: list[list[str]] = []
    used = base
    for c in rest:
        need = widths[c] + COLUMN_OVERHEAD
        if groups and used + need <= width:
            groups[-1].append(c)
            used += need
        else:
            groups.append([c])
            used = base + need
    return [[{c: r.get(c, "") for c in fixed + g} for r in rows] for g in groups or [[]]]

"""The comparison of plain fine-tuning with the convexity paper's fixes (its Tables 1 and 2).

:func:`comparison` collects every ``<task>/<variant>/seed<k>/best/metrics.json`` under a
fine-tuning folder into one row per task, variant and seed; :func:`write_comparison` saves
that as ``comparison.csv`` and a variant x task Markdown table (``comparison.md``) of the
dev score's mean and standard deviation over seeds (in percent: MCC for CoLA, accuracy for
RTE, ...).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from probekit.io import atomic_open, read_json

ORDER = ("plain", "multi-objective", "copy-layers", "drop-layers")


def comparison(out: str | Path) -> pd.DataFrame:
    """One row per task, variant and seed: the chosen dev score and configuration."""
    rows = []
    for path in sorted(Path(out).glob("*/*/seed*/best/metrics.json")):
        m = read_json(path)
        rows.append(
            {
                "task": m["task"],
                "variant": m["variant"],
                "seed": int(m["seed"]),
                "metric": m["metric"],
                "value": float(m["chosen"]["value"]),
                "batch_size": m["chosen"]["batch_size"],
                "lr": m["chosen"]["lr"],
                "epoch": m["chosen"]["epoch"],
                "n_layers": m["model"]["n_layers"],
                "grid": m["hyperparameters"]["grid"] if isinstance(m["hyperparameters"]["grid"], str) else "custom",
                "n_train": m["data"]["n_train"],
                "n_dev": m["data"]["n_dev"],
                "wall_s": m["wall_s"],
                "path": str(path.parent),
            }
        )
    cols = ["task", "variant", "seed", "metric", "value", "batch_size", "lr", "epoch", "n_layers", "grid"]
    return pd.DataFrame(rows, columns=[*cols, "n_train", "n_dev", "wall_s", "path"])


def _variant_key(name: str) -> tuple[int, str]:
    base = next((i for i, v in enumerate(ORDER) if name == v or name.startswith(v + "-")), len(ORDER))
    return base, name


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Variant x task: ``mean ± sd (n)`` of the dev score over seeds, in percent."""
    if table.empty:
        return pd.DataFrame()
    stats = table.groupby(["variant", "task", "metric"]).agg(
        mean=("value", "mean"), sd=("value", "std"), seeds=("value", "size")
    )

    def cell(r: pd.Series) -> str:
        sd = "" if pd.isna(r["sd"]) else f" ± {100 * r['sd']:.1f}"
        return f"{100 * r['mean']:.1f}{sd} ({int(r['seeds'])})"

    stats = stats.assign(cell=stats.apply(cell, axis=1)).reset_index()
    stats["column"] = stats["task"] + " (" + stats["metric"] + ")"
    grid = stats.pivot(index="variant", columns="column", values="cell").fillna("")
    grid = grid.loc[sorted(grid.index, key=_variant_key)]
    return grid.reset_index()


def markdown(grid: pd.DataFrame) -> str:
    """A Markdown table of :func:`summary`."""
    if grid.empty:
        return "(no fine-tuned checkpoints yet)\n"
    cols = list(grid.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in grid.itertuples(index=False)]
    note = "Dev score in percent: mean ± sd over seeds (number of seeds), best epoch and grid configuration per seed."
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_comparison(out: str | Path) -> pd.DataFrame:
    """Write ``out/comparison.csv`` (per seed) and ``out/comparison.md`` (variant x task); return the CSV's table."""
    out = Path(out)
    table = comparison(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "comparison.csv", "w", encoding="utf-8") as f:
        table.to_csv(f, index=False)
    with atomic_open(out / "comparison.md", "w", encoding="utf-8") as f:
        f.write(markdown(summary(table)))
    return table

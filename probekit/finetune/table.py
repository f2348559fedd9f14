"""The comparison of plain fine-tuning with the convexity paper's fixes (its Tables 1 and 2).

:func:`comparison` collects every ``<task>/<variant>/seed<k>/best/metrics.json`` under a
fine-tuning folder into one row per task, variant and seed; :func:`write_comparison` saves
that as ``comparison.csv`` and a variant x task Markdown table (``comparison.md``) of the
dev score's mean and standard deviation over seeds (in percent: MCC for CoLA, accuracy for
RTE, ...). Variants are ordered as :func:`~probekit.finetune.variants.variant_order` says.

:func:`seed_rows` turns a ``metrics.json`` into tidy results rows (:mod:`probekit.results`,
source ``finetune``) and :func:`write_results` merges them into ``results.parquet``/``.csv``,
so that ``probekit report`` reads fine-tuning next to the probes. Besides the schema's columns a
row has ``epoch``, ``step``, ``batch_size``, ``lr``, ``chosen`` (the selected configuration
and epoch), ``variant`` (the registered name; ``mode`` is the slug), ``finetune_task`` and
``n_layers`` (of the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from probekit.finetune.variants import variant_class, variant_order
from probekit.io import atomic_open, read_json
from probekit.results import PARQUET, row, save_results, tidy

KEY = ("finetune_task", "mode", "seed")
"""A fine-tuning row's seed: rows of a seed written again replace the old ones."""


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


def _variant_key(slug: str) -> tuple[int, str]:
    order = variant_order()
    cls = variant_class(slug)
    return (order.index(cls.name) if cls is not None else len(order)), slug


def _model_name(source: str) -> str:
    """A local checkpoint's folder name, or the hub id."""
    return Path(source).name if Path(source).is_absolute() else source


def seed_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A seed's ``metrics.json`` as results rows: every configuration's dev metrics per evaluation."""
    m = metrics
    chosen = m["chosen"]
    settings = m.get("settings") or {}
    variant = (settings.get("variant") or {}).get("name")
    if variant is None:
        cls = variant_class(m["variant"])
        variant = cls.name if cls is not None else m["variant"]
    rows = []
    for run in m["runs"]:
        picked = run["batch_size"] == chosen["batch_size"] and run["lr"] == chosen["lr"]
        for e in run["evals"]:
            for name in m["metrics"]:
                rows.append(
                    row(
                        model=_model_name(m["model"]["source"]),
                        task=m["task"],
                        layer=None,
                        split="dev",
                        metric=name,
                        value=float(e[name]),
                        source="finetune",
                        mode=m["variant"],
                        probe="finetune",
                        seed=int(m["seed"]),
                        n=int(m["data"]["n_dev"]),
                        max_length=m["hyperparameters"].get("max_length"),
                        data_sha256=m["data"].get("sha256"),
                        settings=settings,
                        epoch=float(e["epoch"]),
                        step=int(e["step"]),
                        batch_size=int(run["batch_size"]),
                        lr=float(run["lr"]),
                        chosen=bool(picked and e["step"] == chosen["step"]),
                        variant=variant,
                        finetune_task=m["task"],
                        n_layers=int(m["model"]["n_layers"]),
                    )
                )
    return rows


def write_results(out: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Merge ``rows`` into ``out/results.parquet`` (and ``.csv``), atomically: rows already there from
    other tasks, variants, seeds or analyses stay, those of the same seeds are replaced. Returns the file."""
    out = Path(out)
    new = tidy(list(rows))
    if (out / PARQUET).is_file():
        old = pd.read_parquet(out / PARQUET)
        if all(c in old.columns for c in ("source", *KEY)):
            keys = set(new[list(KEY)].astype(str).itertuples(index=False, name=None))
            mine = (old["source"] == "finetune").to_numpy()
            same = [tuple(k) in keys for k in old[list(KEY)].astype(str).itertuples(index=False, name=None)]
            old = old[~(mine & pd.Series(same, dtype=bool).to_numpy())]
        new = tidy(pd.concat([old, new], ignore_index=True))
    save_results(new, out)
    return out / PARQUET


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

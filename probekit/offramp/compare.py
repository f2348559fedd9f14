"""The comparison table of early-exit methods (the PALBERT paper's): per task and method, the dev score at
the threshold chosen on the held-out split, and the expected and measured speed-ups, seeds as mean and
spread::

    from probekit.offramp.compare import run_comparison, comparison_table
    run = run_comparison("path/to/model", "rte", "runs/compare", methods="deebert,pabee,berxit,palbert",
                         seeds=(0, 1), train_n=2000)
    run.details["table"]          # one row per task, method and policy (CSV/Markdown in runs/compare)

Each method's run is an ordinary :func:`~probekit.offramp.run.run_offramp` in ``out/<method>/seed-<s>``
(checkpointed and resumed as that is); ``out/results.parquet`` holds all their rows, so ``probekit report
out`` draws every method's quality-vs-saving curve on one figure. "plain fine-tuning" is DeeBERT's stage 1
(the encoder fine-tuned with the last off-ramp alone; stage 2 leaves both bit for bit as they are): its
last-layer dev score at speed-up 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probekit.errors import ParamError
from probekit.io import atomic_path
from probekit.offramp.methods import TRAINING_METHODS
from probekit.offramp.run import run_offramp
from probekit.paths import slug
from probekit.results import save_results, tidy
from probekit.runs import Run

PLAIN = "plain fine-tuning"
COLUMNS = (
    "task",
    "method",
    "policy",
    "metric",
    "seeds",
    "threshold",
    "score",
    "score_sd",
    "full_score",
    "expected_speedup",
    "expected_speedup_sd",
    "measured_speedup",
    "measured_speedup_sd",
    "measured_speedup_batched",
)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a list or a comma-separated string (``all``: every registered method)."""
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if items == ["all"]:
        return list(TRAINING_METHODS.names())
    out = []
    for m in items:
        name = TRAINING_METHODS.canonical(m)
        if name not in out:
            out.append(name)
    if not out:
        raise ParamError("methods", "name at least one training method")
    return out


def _speedup(saving: pd.Series) -> pd.Series:
    return 1.0 / (1.0 - pd.to_numeric(saving, errors="coerce"))


def _main_metric(rows: pd.DataFrame) -> str:
    for m in ("acc", "mcc", "f1", "pearson", "spearman"):
        if (rows["metric"] == m).any():
            return m
    return str(rows["metric"].iloc[0])


def comparison_table(results: pd.DataFrame, native_only: bool = False) -> pd.DataFrame:
    """Per task, method (``mode``) and policy: the dev score at the held-out-chosen threshold (``chosen``
    rows), the last off-ramp's dev score, and the expected / measured speed-ups (1 / (1 - saving)), each the
    mean over seeds with its standard deviation (``_sd``, 0 for one seed); plus a "plain fine-tuning" row
    from DeeBERT's last layer when a deebert run is present. ``native_only``: each method's own exit
    policies (``native`` rows: PABEE's patience, BERxiT's LTE, PALBERT's Q-exit and sampling exit, ...)."""
    out: list[dict[str, Any]] = []
    for task, rows in results.groupby("task", sort=False):
        metric = _main_metric(
            rows[rows["source"] == "exit-policy"] if (rows["source"] == "exit-policy").any() else rows
        )
        layers = rows[(rows["source"] == "offramp") & (rows["metric"] == metric)]
        last = layers[pd.to_numeric(layers["layer"]) == pd.to_numeric(layers["layer"]).max()]
        full = last.groupby("mode")["value"].agg(["mean", "std", "count"])
        pol = rows[(rows["source"] == "exit-policy") & (rows["metric"] == metric)]
        pol = pol[pol["chosen"].fillna(False).astype(bool)] if "chosen" in pol else pol.iloc[:0]
        if "deebert" in full.index:
            f = full.loc["deebert"]
            out.append(
                {
                    "task": task,
                    "method": PLAIN,
                    "policy": "none",
                    "metric": metric,
                    "seeds": int(f["count"]),
                    "score": f["mean"],
                    "score_sd": 0.0 if pd.isna(f["std"]) else f["std"],
                    "full_score": f["mean"],
                    "expected_speedup": 1.0,
                    "expected_speedup_sd": 0.0,
                    "measured_speedup": 1.0,
                    "measured_speedup_sd": 0.0,
                    "measured_speedup_batched": 1.0,
                }
            )
        for (mode, policy), cur in pol.groupby(["mode", "policy"], sort=False):
            if native_only and not ("native" in cur and cur["native"].fillna(False).astype(bool).all()):
                continue
            exp = _speedup(cur["expected_saving"])
            meas = _speedup(cur["measured_saving"]) if "measured_saving" in cur else pd.Series(np.nan, cur.index)
            batched = (
                _speedup(cur["measured_saving_batched"])
                if "measured_saving_batched" in cur
                else pd.Series(np.nan, cur.index)
            )
            sd = lambda s: 0.0 if len(s.dropna()) < 2 else float(s.std())  # noqa: E731
            out.append(
                {
                    "task": task,
                    "method": mode,
                    "policy": policy,
                    "metric": metric,
                    "seeds": int(cur["seed"].nunique()),
                    "threshold": float(cur["threshold"].mean()) if cur["seed"].nunique() == 1 else np.nan,
                    "score": float(cur["value"].mean()),
                    "score_sd": sd(cur["value"]),
                    "full_score": float(full.loc[mode, "mean"]) if mode in full.index else np.nan,
                    "expected_speedup": float(exp.mean()),
                    "expected_speedup_sd": sd(exp),
                    "measured_speedup": float(meas.mean()),
                    "measured_speedup_sd": sd(meas),
                    "measured_speedup_batched": float(batched.mean()),
                }
            )
    return pd.DataFrame(out, columns=list(COLUMNS))


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: score +- sd (in percent for scores in [0, 1]), speed-ups as 1.23x +- sd."""
    lines = [
        "| task | method | policy | seeds | score | full model | expected speed-up | measured speed-up (batch 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pm(v: float, sd: float, fmt: str) -> str:
        if pd.isna(v):
            return "-"
        return f"{v:{fmt}}" + (f" ± {sd:{fmt}}" if sd and not pd.isna(sd) else "")

    for r in table.itertuples():
        lines.append(
            f"| {r.task} | {r.method} | {r.policy} | {r.seeds} | {pm(r.score, r.score_sd, '.4f')} | "
            f"{pm(r.full_score, 0.0, '.4f')} | {pm(r.expected_speedup, r.expected_speedup_sd, '.2f')}x | "
            f"{pm(r.measured_speedup, r.measured_speedup_sd, '.2f')}x |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(table: pd.DataFrame, out: str | Path) -> dict[str, Path]:
    """``comparison.csv`` and ``comparison.md`` in ``out`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "comparison.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "comparison.md") as tmp:
        Path(tmp).write_text(to_markdown(table), encoding="utf-8")
    return {"comparison": out / "comparison.csv", "comparison_md": out / "comparison.md"}


def run_comparison(
    model: Any,
    task: Any,
    out: str | Path,
    methods: str | Sequence[str] = "deebert,pabee,berxit,pondernet,palbert,slf,smart-alternating",
    seeds: Sequence[int] = (0,),
    **options: Any,
) -> Run:
    """Run :func:`~probekit.offramp.run.run_offramp` for every method and seed (``out/<method>/seed-<s>``),
    write all rows to ``out/results.parquet`` and the comparison table to ``out/comparison.csv`` / ``.md``.
    ``options`` are run_offramp's (``train_n=``, ``epochs=``, ``policies=``, ``device=``, ...)."""
    out = Path(out)
    names = parse_methods(methods)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ParamError("seeds", "name at least one seed")
    options.pop("seed", None)
    runs: dict[tuple[str, int], Run] = {}
    for name in names:
        for seed in seeds:
            runs[(name, seed)] = run_offramp(model, task, out / slug(name) / f"seed-{seed}", name, seed=seed, **options)
    results = tidy(pd.concat([r.results for r in runs.values()], ignore_index=True))
    save_results(results, out)
    table = comparison_table(results)
    paths = write_comparison(table, out)
    native = comparison_table(results, native_only=True)
    return Run(
        results=results,
        paths={"out": out, "results": out / "results.parquet", **paths},
        timings={f"{m}/seed-{s}": r.timings.get("total", float("nan")) for (m, s), r in runs.items()},
        details={"table": table, "native": native, "runs": runs},
    )


def offramp_peaks(results: pd.DataFrame) -> pd.DataFrame:
    """The convexity view of the off-ramps: per model, task, method and metric, the layer whose off-ramp
    scores best (mean over seeds), its score, the last layer's and the drop between them."""
    rows = results[results["source"] == "offramp"]
    out = []
    for (model, task, mode, metric), cur in rows.groupby(["model", "task", "mode", "metric"], sort=False):
        curve = cur.groupby(pd.to_numeric(cur["layer"]))["value"].mean()
        peak = int(curve.idxmax())
        out.append(
            {
                "model": model,
                "task": task,
                "method": mode,
                "metric": metric,
                "peak_layer": peak,
                "layers": int(curve.index.max()),
                "peak": float(curve.max()),
                "last": float(curve.iloc[-1]),
                "drop": float(curve.max() - curve.iloc[-1]),
                "seeds": int(cur["seed"].nunique()),
            }
        )
    return pd.DataFrame(out)

"""``probekit report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import app
from probekit.errors import ProbekitError


def _mapping(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        model, sep, task = pair.partition("=")
        if not sep or not model or not task:
            raise ProbekitError(f"--finetune-task takes MODEL=TASK, not {pair!r}")
        out[model] = task
    return out


@app.command()
def report(
    results: Annotated[
        list[Path],
        typer.Argument(help="Results folders or files (results.parquet); several models are laid out side by side."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Report folder, e.g. reports/NAME (replaced if it is a report).")
    ],
    baseline: Annotated[
        Path | None, typer.Option(help="Pre-trained model's results: adds fine-tuned minus pre-trained deltas.")
    ] = None,
    finetune_task: Annotated[
        list[str] | None,
        typer.Option(
            "--finetune-task", help="MODEL=TASK: the task a model was fine-tuned on (for the task grid); repeat."
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Probe split to report (default: test, else dev).")] = None,
    metric: Annotated[str, typer.Option(help="Probe metric: acc, selectivity, control_acc.")] = "acc",
    top: Annotated[int, typer.Option(help="Highest layers averaged in the fine-tuning grid.")] = 4,
    title: Annotated[str | None, typer.Option(help="Page title (default: from --out).")] = None,
) -> None:
    """Write an HTML report (figures, convexity and delta tables, summary.md) from results tables."""
    from probekit.report import build_report

    path = build_report(
        results,
        out,
        baseline=baseline,
        finetune_tasks=_mapping(finetune_task),
        split=split,
        metric=metric,
        top=top,
        title=title,
    )
    typer.echo(f"report: {path / 'index.html'}")

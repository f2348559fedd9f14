"""``probekit report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.cli import app
from probekit.cli.common import check_paths, writing
from probekit.cli.options import derive
from probekit.errors import ProbekitError
from probekit.report import ReportConfig, build_report


def _mapping(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        model, sep, task = pair.partition("=")
        if not sep or not model or not task:
            raise ProbekitError(f"--finetune-task takes MODEL=TASK, not {pair!r}")
        out[model] = task
    return out


@app.command()
@derive(lambda: [("report", ReportConfig)], labelled=False)
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
    options: dict[str, Any] | None = None,
) -> None:
    """Write an HTML report (figures, convexity and delta tables, summary.md) from results tables."""
    check_paths(inputs={"results": results, "baseline": baseline}, outputs={"out": out})
    with writing(out):
        path = build_report(results, out, baseline=baseline, finetune_tasks=_mapping(finetune_task), **(options or {}))
    typer.echo(f"report: {path / 'index.html'}")

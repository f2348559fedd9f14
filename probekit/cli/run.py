"""``probekit run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Quiet, check_paths, print_table
from probekit.suite import run_suite


@app.command()
def run(
    suite: Annotated[Path, typer.Argument(help="Suite file (TOML), e.g. probes/convexity_study.toml.")],
    data_dir: DataDir = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Use this pre-trained model instead of the suite's [model].")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Run a study: fine-tune, extract every checkpoint, probe, report (baseline: the pre-trained model).

    Steps already done are skipped, so an interrupted study resumes. Relative paths in the file are
    relative to the file.
    """
    check_paths(files={"suite": suite}, data_dir=data_dir)
    result = run_suite(suite, data_dir=data_dir, model=model, progress=not quiet)
    print_table(
        [
            {"step": s.step, "target": s.target, "status": s.status, "seconds": s.seconds, "detail": s.detail}
            for s in result.steps
        ],
        title=f"{result.suite.name}: {len(result.ran)} step(s) ran, {len(result.steps) - len(result.ran)} skipped",
    )
    typer.echo(f"report: {result.suite.report / 'index.html'}")

"""``probekit senteval-check``: probekit's protocol and the original SentEval engine side by side on a cache."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from probekit.cli import app
from probekit.cli.common import Quiet, check_paths, writing
from probekit.probes.protocols import PROTOCOLS
from probekit.senteval import ENV, senteval_check

CheckProtocol = StrEnum("CheckProtocol", {name: name for name in PROTOCOLS.names()})


@app.command("senteval-check")
def senteval_check_cmd(
    caches: Annotated[list[Path], typer.Argument(help="Cache directories, or folders of caches (probekit extract).")],
    protocol: Annotated[
        CheckProtocol,
        typer.Option(
            "--protocol",
            help="A probe protocol: senteval (SentEval's default), senteval-sklearn, or a tuned MLP preset "
            "(conneau2018: the engine once per nhid x dropout, the best on dev kept per layer).",
        ),
    ] = CheckProtocol.senteval,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Comma-separated layers (default: all).", show_default=False)
    ] = None,
    senteval: Annotated[
        Path | None,
        typer.Option(
            "--senteval", help=f"SentEval checkout (the folder holding senteval/; default ${ENV}).", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Save both sets of rows here (results.parquet, results.csv).")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Run the original SentEval engine layer by layer on each cache (on the data file it was extracted from)
    and probekit's same protocol, and print both accuracies with their difference in points."""
    check_paths(folders={"caches": [c for c in caches if c.exists()], "senteval": senteval}, outputs={"out": out})
    chosen = None
    if layers is not None:
        try:
            chosen = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(
                f"expected comma-separated layer numbers, got {layers!r}", param_hint="--layers"
            ) from None
    if out is not None:
        with writing(out):
            run = senteval_check(caches, str(protocol.value), chosen, senteval, out, progress=not quiet)
    else:
        run = senteval_check(caches, str(protocol.value), chosen, senteval, None, progress=not quiet)
    table = run.details["comparison"]
    console = Console()
    shown = Table(title=f"{protocol.value}: probekit vs SentEval (accuracy %, diff in points)")
    for col in ("task", "layer", "split", "probekit", "senteval", "diff"):
        shown.add_column(col, justify="left" if col in ("task", "split") else "right")
    for r in table.itertuples():
        shown.add_row(
            r.task,
            str(r.layer),
            r.split,
            f"{100 * r.probekit:.2f}",
            f"{100 * r.senteval:.2f}",
            f"{round(r.diff, 2) + 0.0:+.2f}",
        )
    console.print(shown)
    for split in ("dev", "test"):
        d = table[table["split"] == split]["diff"].abs()
        if len(d):
            console.print(f"{split}: mean |diff| {d.mean():.2f} points, largest {d.max():.2f}")
    if out is not None:
        console.print(f"results: {out}")

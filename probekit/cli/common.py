"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory (layout senteval/probing/*.txt, glue/<TASK>/*.tsv). "
        "Searched before $PROBEKIT_DATA_DIR and the user cache dir.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

console = Console(stderr=False)


def print_table(rows: list[dict[str, object]], title: str | None = None) -> None:
    """Print dict rows as a table (nothing but a note when there are none)."""
    if not rows:
        console.print(f"[dim]{title or 'nothing'}: none[/dim]")
        return
    table = Table(title=title, show_lines=False)
    for col in rows[0]:
        table.add_column(str(col), overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)

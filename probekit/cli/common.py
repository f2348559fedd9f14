"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from probekit.distributed import dist_info
from probekit.errors import ProbekitError
from probekit.io import exclusive

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory (layout senteval/probing/*.txt, glue/<TASK>/*.tsv). "
        "Searched before $PROBEKIT_DATA_DIR and the user cache dir.",
        show_default=False,
    ),
]
Model = Annotated[str, typer.Option("--model", "-m", help="Hugging Face model id or local checkpoint folder.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

console = Console(stderr=False)
PATH_COLUMNS = ("cache", "checkpoint", "path", "report", "target")


def parse_floats(text: str | None, option: str, example: str = "0.25,0.5,1") -> list[float] | None:
    """A comma-separated list of numbers (``None`` when not given), or a one-line user error."""
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ProbekitError(f"{option} takes comma-separated numbers (e.g. {example}), got {text!r}") from None


def print_table(rows: list[dict[str, object]], title: str | None = None) -> None:
    """Print dict rows as a table (nothing but a note when there are none)."""
    if not rows:
        console.print(f"[dim]{title or 'nothing'}: none[/dim]")
        return
    table = Table(title=title, show_lines=False)
    for col in rows[0]:
        # words wrap at spaces (never mid-word); only paths, which have no spaces, fold
        table.add_column(str(col), overflow="fold" if col in PATH_COLUMNS else "ellipsis")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def writing(out: Path) -> contextlib.AbstractContextManager[None]:
    """The lock a command holds on its output folder (:func:`probekit.io.exclusive`): another probekit
    process writing ``out`` at the same time is refused in one line. Under torchrun only rank 0 locks."""
    return exclusive(out) if dist_info().is_main else contextlib.nullcontext()

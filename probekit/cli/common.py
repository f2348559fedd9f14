"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from probekit.distributed import dist_info
from probekit.errors import ParamError, ProbekitError
from probekit.io import exclusive
from probekit.paths import check_input, check_output

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


def check_paths(
    inputs: dict[str, list[Path | None] | Path | None] | None = None,
    folders: dict[str, list[Path | None] | Path | None] | None = None,
    files: dict[str, list[Path | None] | Path | None] | None = None,
    names_or_files: dict[str, list[str] | str | None] | None = None,
    outputs: dict[str, Path | None] | None = None,
    data_dir: Path | None = None,
) -> None:
    """Check a command's path arguments (by parameter name) before anything is read or written: inputs that
    may be a file or a folder, folders, files, values that are a name or a file (``--task``, ``--corpus``: an
    existing folder is refused), output folders, and a data directory (which may be missing: the task then says
    what it did not find, but it must not be a file)."""

    def each(value: list[Path | None] | Path | None) -> list[Path]:
        values = value if isinstance(value, list) else [value]
        return [v for v in values if v is not None]

    for kind, group in (("any", inputs), ("dir", folders), ("file", files)):
        for param, value in (group or {}).items():
            for path in each(value):
                check_input(path, param, kind)  # type: ignore[arg-type]
    for param, value in (names_or_files or {}).items():
        for text in [value] if isinstance(value, str) else value or []:
            if ("/" in text or os.sep in text) and Path(text).is_dir():  # a bare name is a task name
                raise ParamError(param, f"{text} is a folder; give a file (or a task name)")
    for param, path in (outputs or {}).items():
        if path is not None:
            check_output(path, param)
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise ParamError("data_dir", f"{data_dir} is a file; give a folder")


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

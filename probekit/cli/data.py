"""``probekit data``: list the known tasks and download datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import SubGroup, app
from probekit.cli.common import DataDir, Quiet, check_paths, print_table
from probekit.data import FETCHERS, list_tasks, locate
from probekit.data.fetch import fetch as run_fetch
from probekit.data.fetch import read_sums
from probekit.errors import ProbekitError

data_app = typer.Typer(cls=SubGroup, help="List tasks and download datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def fetch(
    collection: Annotated[str, typer.Argument(help=f"Which datasets: {', '.join(FETCHERS.names())}.")],
    dest: Annotated[Path | None, typer.Option(help="Data directory to fill (default: the user cache dir).")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help="Only these tasks; repeat.")] = None,
    base_url: Annotated[str | None, typer.Option(help="Download from this mirror instead of the official URL.")] = None,
    checksums: Annotated[
        Path | None, typer.Option(help="A sha256sum-style file whose checksums override the recorded ones.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download again even if the files are present.")] = False,
    quiet: Quiet = False,
) -> None:
    """Download official data files, verified by SHA-256; resumable."""
    check_paths(files={"checksums": checksums}, outputs={"dest": dest})
    sums = read_sums(checksums) if checksums else None
    paths = run_fetch(
        collection, dest=dest, tasks=task, base_url=base_url, checksums=sums, force=force, progress=not quiet
    )
    for p in paths:
        typer.echo(str(p))


@data_app.command("ls")
def ls(
    collection: Annotated[str | None, typer.Argument(help="Only this collection.")] = None, data_dir: DataDir = None
) -> None:
    """List the registered tasks and where each one's data was found."""
    rows = []
    for t in list_tasks(collection):
        try:
            where = str(locate(t, data_dir))
        except ProbekitError:
            where = "missing"
        rows.append(
            {
                "task": t.name,
                "aliases": ", ".join(t.aliases),
                "collection": t.collection,
                "description": t.description,
                "found": where,
            }
        )
    print_table(rows, title="tasks")

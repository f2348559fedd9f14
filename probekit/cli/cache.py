"""``probekit cache``: list and delete feature caches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from probekit.cache import LayerCache, find_caches, list_caches, remove_cache
from probekit.cli import SubGroup, app
from probekit.cli.common import print_table

cache_app = typer.Typer(cls=SubGroup, help="List, check and delete feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def ls(root: Annotated[Path, typer.Argument(help="A cache root (or one cache).")] = Path("caches")) -> None:
    """List the caches below ROOT."""
    print_table(list_caches(root), title=f"caches in {root}")


@cache_app.command("verify")
def verify(paths: Annotated[list[Path], typer.Argument(help="Caches or cache roots.")]) -> None:
    """Check every array of each cache against the checksums in its manifest."""
    for p in find_caches(paths):
        LayerCache.open(p, verify=True)
        typer.echo(f"ok  {p}")


@cache_app.command("rm")
def rm(
    paths: Annotated[list[Path], typer.Argument(help="Caches or cache roots to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete caches (every cache below a root)."""
    targets = find_caches(paths)
    for p in targets:
        typer.echo(str(p))
    if not yes:
        typer.confirm(f"delete {len(targets)} cache(s)?", abort=True)
    for p in targets:
        remove_cache(p)
    typer.echo(f"deleted {len(targets)} cache(s)")

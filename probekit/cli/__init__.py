"""The ``probekit`` command: a thin layer over the Python API.

Each sub-command lives in its own module of this package and registers itself on
``app``; adding a command is adding a module. User errors
(:class:`~probekit.errors.ProbekitError`) end the command with one readable line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from probekit._version import __version__
from probekit.cli.options import flags_of
from probekit.errors import ProbekitError
from probekit.plugins import load_plugins


class _Group(TyperGroup):
    """The one error boundary: user errors raised anywhere below become one line and exit code 2, with
    the parameter names of the library's messages rendered as the invoked command's flags."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProbekitError as e:
            typer.echo(f"error: {e.render(_flags(ctx))}", err=True)
            raise typer.Exit(code=e.exit_code) from None


def _flags(ctx: click.Context) -> dict[str, str]:
    """Parameter name -> flag of the sub-command that ran (and of its own sub-command, for groups)."""
    flags = {"fresh": "--fresh", "resume": "--resume"}
    name = ctx.invoked_subcommand
    cmd = ctx.command.get_command(ctx, name) if isinstance(ctx.command, click.Group) and name else None
    if cmd is not None:
        flags.update(flags_of(cmd))
    return flags


app = typer.Typer(
    cls=_Group,
    name="probekit",
    help="Layerwise probing and analysis of transformer encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"probekit {__version__}")
        raise typer.Exit()


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    print(f"warning: {message}", file=sys.stderr)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Layerwise probing and analysis of transformer encoders (BERT and its family)."""
    warnings.showwarning = _one_line_warning


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="probekit")


def _register_commands() -> None:
    """Load plugins (their components' options must exist before the commands derive theirs), then import
    every command module of this package: each registers its command(s) on ``app``."""
    load_plugins()
    first = ["extract", "probe"]  # the main job's commands come first in --help
    names = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("common", "options")]
    for name in sorted(names, key=lambda n: (n not in first, first.index(n) if n in first else 0, n)):
        importlib.import_module(f"{__name__}.{name}")


_register_commands()

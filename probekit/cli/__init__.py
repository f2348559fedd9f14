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
from probekit.paths import strict_outputs
from probekit.plugins import load_plugins


class SubGroup(TyperGroup):
    """A command group that remembers which sub-command it resolved, so the error boundary can render the
    library's parameter names as that command's flags (``probekit data fetch --dest``); every group uses it."""

    resolved: click.Command | None = None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[Any, Any, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        self.resolved = cmd  # the sub-command about to run: its flags render the library's parameter names
        return name, cmd, rest


def _invoked_flags(cmd: click.Command | None) -> dict[str, str]:
    """Parameter name -> flag of the command that ran, through every group on the way to it."""
    flags: dict[str, str] = {}
    while cmd is not None:
        flags.update(flags_of(cmd))
        cmd = getattr(cmd, "resolved", None)
    return flags


class _Group(SubGroup):
    """The one error boundary: user errors raised anywhere below become one line and exit code 2, with
    the parameter names of the library's messages rendered as the invoked command's flags."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with strict_outputs():  # refuse to write into a folder holding things probekit did not write
                return super().invoke(ctx)
        except ProbekitError as e:
            flags = {"fresh": "--fresh", "resume": "--resume", **_invoked_flags(self.resolved)}
            typer.echo(f"error: {e.render(flags)}", err=True)
            raise typer.Exit(code=e.exit_code) from None


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

"""``probekit probe``: its kind-specific options (``--max-iter``, ``--nhid``, ``--grid``...) are derived from
the registered probe kinds' configs when the CLI is built, so a plugin's kind gets its flags for free."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from probekit.cli import app
from probekit.cli.common import Device, Quiet, check_paths, writing
from probekit.cli.options import derive
from probekit.config import Config
from probekit.data import short_name
from probekit.distributed import dist_info
from probekit.probes import PROBE_KINDS
from probekit.probes import probe as run_probe
from probekit.probes.protocols import PROTOCOLS
from probekit.probes.table import fit_width, table_title, task_table


def _sources() -> list[tuple[str, type[Config]]]:
    kinds = [(name, cls.Config) for name, cls in PROBE_KINDS.items()]
    return kinds + [(name, cls.Config) for name, cls in PROTOCOLS.items() if cls.Config.field_names()]


Kind = StrEnum("Kind", {name: name for name in PROBE_KINDS.names()})  # type: ignore[misc]
"""The registered kinds when the CLI is built (plugins included)."""
KIND_HELP = (
    "Probe kind (default: the protocol's, else linear): "
    + "; ".join(f"{n} ({PROBE_KINDS.help(n).rstrip('.')})" for n in PROBE_KINDS.names())
    + "."
)
Protocol = StrEnum("Protocol", {name: name for name in PROTOCOLS.names()})  # type: ignore[misc]
PROTOCOL_HELP = (
    "Protocol preset (sets the kind and its options; options given override them; default: senteval-sklearn "
    "for the linear probe): " + "; ".join(f"{n} ({PROTOCOLS.help(n).rstrip('.')})" for n in PROTOCOLS.names()) + "."
)


@app.command()
@derive(_sources)
def probe(
    caches: Annotated[list[Path], typer.Argument(help="Cache directories, or folders of caches (probekit extract).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.parquet, results.csv).")],
    kind: Annotated[Kind | None, typer.Option("--probe", help=KIND_HELP, show_default=False)] = None,
    protocol: Annotated[Protocol | None, typer.Option("--protocol", help=PROTOCOL_HELP, show_default=False)] = None,
    seeds: Annotated[int, typer.Option(help="Run seeds 0..N-1 (control permutation, MLP init and batches).")] = 1,
    device: Device = "auto",
    control: Annotated[bool, typer.Option("--control/--no-control", help="Shuffled-label control probe.")] = True,
    resume: Annotated[
        bool, typer.Option("--resume/--fresh", help="Skip fits already in OUT with the same settings.")
    ] = True,
    quiet: Quiet = False,
    *,
    options: dict[str, Any],
) -> None:
    """Train a probe on every layer of every cached task (SentEval protocol) and print test accuracy."""
    # a missing cache folder is the library's to report (it names what it looked for)
    check_paths(folders={"caches": [c for c in caches if c.exists()]}, outputs={"out": out})
    with writing(out):
        run = run_probe(
            caches,
            kind=None if kind is None else str(kind.value),
            protocol=None if protocol is None else str(protocol.value),
            seeds=seeds,
            device=device,
            control=control,
            out=out,
            resume=resume,
            progress=not quiet,
            **options,
        )
    if not dist_info().is_main:
        return
    console = Console()  # made here: it reads the terminal's width (COLUMNS) of this invocation
    print_summary(run.results, console)
    print_compression(run.results, console)
    console.print(f"results: {out}")


def _print_wide(cells: list[dict[str, str]], console: Console) -> None:
    """Rows of a tasks x layers table, split into as many tables as the terminal's width needs."""
    for part in fit_width(cells, console.width):
        table = Table(show_lines=False)
        for col in part[0]:
            table.add_column(col, no_wrap=True, justify="left" if col == "task" else "right")
        for row in part:
            table.add_row(*row.values())
        console.print(table)


def print_summary(results: pd.DataFrame, console: Console, split: str = "test") -> None:
    """Test accuracy, tasks in rows and layers in columns, in as many tables as the terminal's width needs."""
    console.print(table_title(results, split))
    _print_wide(task_table(results, split), console)


def print_compression(results: pd.DataFrame, console: Console) -> None:
    """The MDL probe's compression (uniform / online codelength; control in brackets), tasks x layers."""
    rows = results[(results["split"] == "train") & results["metric"].isin(["compression", "control_compression"])]
    if rows.empty:
        return
    wide = rows.pivot_table(index=["task", "layer"], columns="metric", values="value", sort=False)
    console.print("MDL compression, uniform / online codelength (shuffled-label control), mean over seeds")
    layers = sorted(int(x) for x in rows["layer"].dropna().unique())
    cells = [
        {
            "task": short_name(str(task)),
            **{
                str(layer): f"{wide.loc[(task, layer), 'compression']:.2f}"
                + (f" ({wide.loc[(task, layer), 'control_compression']:.2f})" if "control_compression" in wide else "")
                for layer in layers
                if (task, layer) in wide.index
            },
        }
        for task in dict.fromkeys(rows["task"])
    ]
    _print_wide(cells, console)

"""``probekit probe``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.cli import app
from probekit.cli.common import Device, Quiet, console, parse_floats, print_table


class Kind(StrEnum):
    linear = "linear"
    mlp = "mlp"


@app.command()
def probe(
    caches: Annotated[list[Path], typer.Argument(help="Cache directories, or folders of caches (probekit extract).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.parquet, results.csv).")],
    kind: Annotated[Kind, typer.Option("--probe", help="linear (logistic regression) or mlp (SentEval's MLP).")] = (
        Kind.linear
    ),
    seeds: Annotated[int, typer.Option(help="Run seeds 0..N-1 (control permutation, MLP init and batches).")] = 1,
    device: Device = "auto",
    grid: Annotated[
        str | None,
        typer.Option(
            help="Regularisation grid, comma-separated: C for linear (default 0.25..8), "
            "weight decay for mlp (default 1e-5..1e-2).",
            show_default=False,
        ),
    ] = None,
    control: Annotated[bool, typer.Option("--control/--no-control", help="Shuffled-label control probe.")] = True,
    max_iter: Annotated[int, typer.Option(help="linear: L-BFGS iteration limit.")] = 1000,
    tol: Annotated[float, typer.Option(help="linear: gradient tolerance (scikit-learn's tol).")] = 1e-4,
    nhid: Annotated[int, typer.Option(help="mlp: hidden units.")] = 50,
    dropout: Annotated[float, typer.Option(help="mlp: dropout on the hidden layer.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="mlp: mini-batch size.")] = 64,
    max_epoch: Annotated[int, typer.Option(help="mlp: epoch limit (it stops early on dev before).")] = 200,
    resume: Annotated[
        bool, typer.Option("--resume/--fresh", help="Skip fits already in OUT with the same settings.")
    ] = True,
    quiet: Quiet = False,
) -> None:
    """Train a probe on every layer of every cached task (SentEval protocol) and print test accuracy."""
    from probekit.probes import probe as run
    from probekit.probes.table import layer_table, table_title

    options: dict[str, Any] = (
        {"max_iter": max_iter, "tol": tol}
        if kind is Kind.linear
        else {"nhid": nhid, "dropout": dropout, "batch_size": batch_size, "max_epoch": max_epoch}
    )
    results = run(
        caches,
        kind=kind.value,
        seeds=seeds,
        device=device,
        grid=parse_floats(grid, "--grid", "0.25,0.5,1,2,4,8"),
        control=control,
        out=out,
        resume=resume,
        progress=not quiet,
        **options,
    )
    from probekit.distributed import dist_info

    if not dist_info().is_main:
        return
    print_table(layer_table(results), title=table_title(results))
    console.print(f"results: {out}")

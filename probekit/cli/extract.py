"""``probekit extract``: its extraction options are derived from :class:`probekit.extraction.ExtractConfig`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.backbone import COMPUTE_DTYPES
from probekit.cli import app
from probekit.cli.common import DataDir, Device, Model, Quiet, check_paths, print_table
from probekit.cli.options import derive
from probekit.distributed import dist_info
from probekit.extraction import ExtractConfig
from probekit.extraction import extract as run_extract

DType = StrEnum("DType", {d: d for d in COMPUTE_DTYPES})  # type: ignore[misc]
"""The compute dtypes as a typer choice (derived from :data:`probekit.backbone.COMPUTE_DTYPES`; other commands
with a ``--dtype`` use it)."""


@app.command()
@derive(lambda: [("extraction", ExtractConfig)], labelled=False)
def extract(
    model: Model,
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task name, alias or SentEval-format file; repeat.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache root; caches go to OUT/<model>/<task>-...")],
    device: Device = "auto",
    include_special: Annotated[
        bool, typer.Option("--include-special/--exclude-special", help="Mean pooling over [CLS]/[SEP] too.")
    ] = True,
    data_dir: DataDir = None,
    name: Annotated[str | None, typer.Option(help="Model name in caches and results (default: from --model).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow models that ship their own code.")] = False,
    fresh: Annotated[
        bool, typer.Option(help="Start an interrupted extraction made with another batch plan over (else refused).")
    ] = False,
    quiet: Quiet = False,
    *,
    options: dict[str, Any],
) -> None:
    """Run a frozen encoder over tasks and cache every hidden layer (0 = embeddings).

    Under torchrun or accelerate launch the work is sharded over the processes.
    """
    check_paths(names_or_files={"task": task}, outputs={"out": out}, data_dir=data_dir)
    caches = run_extract(
        model,
        task,
        out,
        **options,
        device=device,
        include_special=include_special,
        data_dir=data_dir,
        trust_remote_code=trust_remote_code,
        name=name,
        progress=not quiet,
        fresh=fresh,
    )
    if not dist_info().is_main:
        return
    print_table(
        [
            {
                "task": c.task,
                "layers": c.n_layers,
                "dim": c.hidden_size,
                **{s: c.manifest["splits"][s]["n"] for s in c.splits},
                "cache": str(c.path),
            }
            for c in caches
        ],
        title="caches",
    )

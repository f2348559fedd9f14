"""``probekit extract``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Device, Model, Quiet, print_table


class Pool(StrEnum):
    mean = "mean"
    cls = "cls"
    tokens = "tokens"


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class StorageDType(StrEnum):
    float16 = "float16"
    float32 = "float32"


class Unseen(StrEnum):
    error = "error"
    drop = "drop"


@app.command()
def extract(
    model: Model,
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task name, alias or SentEval-format file; repeat.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache root; caches go to OUT/<model>/<task>-...")],
    pool: Annotated[Pool, typer.Option(help="mean (mask-aware), cls, or tokens (token-level).")] = Pool.mean,
    max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens.")] = 128,
    batch_size: Annotated[str, typer.Option(help="Texts per batch, or auto (token budget, halves on OOM).")] = "auto",
    device: Device = "auto",
    dtype: Annotated[DType, typer.Option(help="Compute dtype: auto = float32 on CPU, bf16/fp16 on GPU.")] = DType.auto,
    storage_dtype: Annotated[StorageDType, typer.Option(help="dtype of the cached arrays.")] = StorageDType.float16,
    include_special: Annotated[
        bool, typer.Option("--include-special/--exclude-special", help="Mean pooling over [CLS]/[SEP] too.")
    ] = True,
    unseen_labels: Annotated[
        Unseen, typer.Option(help="dev/test rows with a label never seen in train: error, or drop them.")
    ] = Unseen.error,
    data_dir: DataDir = None,
    name: Annotated[str | None, typer.Option(help="Model name in caches and results (default: from --model).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow models that ship their own code.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run a frozen encoder over tasks and cache every hidden layer (0 = embeddings).

    Under torchrun or accelerate launch the work is sharded over the processes.
    """
    from probekit.distributed import dist_info
    from probekit.extraction import extract as run

    caches = run(
        model,
        task,
        out,
        pool=pool.value,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype.value,
        storage_dtype=storage_dtype.value,
        include_special=include_special,
        data_dir=data_dir,
        unseen_labels=unseen_labels.value,
        trust_remote_code=trust_remote_code,
        name=name,
        progress=not quiet,
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

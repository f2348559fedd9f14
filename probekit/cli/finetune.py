"""``probekit finetune``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Model, Quiet, print_table
from probekit.finetune.variants import MLM_WARMUP_STEPS


class GridName(StrEnum):
    default = "default"
    quick = "quick"


class VariantName(StrEnum):
    plain = "plain"
    multi_objective = "multi-objective"
    copy_layers = "copy-layers"
    drop_layers = "drop-layers"
    all = "all"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class FtDevice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def finetune(
    model: Model,
    task: Annotated[
        list[str], typer.Option("--task", "-t", help="GLUE task (cola, rte, sst2, mrpc, stsb...); repeat.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder: OUT/<task>/<variant>/seed<k>/best, comparison.md")],
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 (each runs the whole grid).")] = 3,
    grid: Annotated[
        GridName,
        typer.Option(help="default: batch 16/32 x lr 2e-5/3e-5/5e-5, 5 epochs; quick: batch 32, lr 5e-5, 3 epochs."),
    ] = GridName.default,
    variant: Annotated[
        list[VariantName],
        typer.Option(
            help="plain, or the convexity paper's fixes: multi-objective, copy-layers, drop-layers; all; repeat."
        ),
    ] = [VariantName.plain],  # noqa: B006 (typer needs a list default)
    copy_from: Annotated[
        int | None, typer.Option(help="copy-layers: layer K (1..L-1) whose weights initialise the layers above it.")
    ] = None,
    drop: Annotated[int | None, typer.Option(help="drop-layers: how many top layers to remove.")] = None,
    mlm_weight: Annotated[float, typer.Option(help="multi-objective: weight of the MLM loss.")] = 1.0,
    mlm_warmup: Annotated[
        int, typer.Option(help="multi-objective: steps training the new MLM head alone before fine-tuning.")
    ] = MLM_WARMUP_STEPS,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Train on a fixed random subset of this many examples.", show_default=False)
    ] = None,
    max_dev_samples: Annotated[
        int | None, typer.Option(help="Evaluate on a fixed random subset of dev.", show_default=False)
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the grid's epochs.", show_default=False)] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps (evaluated at the end).", show_default=False)
    ] = None,
    max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens.")] = 128,
    device: Annotated[FtDevice, typer.Option(help="auto, cpu or cuda.")] = FtDevice.auto,
    precision: Annotated[
        Precision, typer.Option(help="auto: fp32 on CPU, bf16 (else fp16) mixed precision on GPU.")
    ] = Precision.auto,
    threads: Annotated[
        int, typer.Option(help="CPU threads for torch (0: its default; 1 is often fastest on a busy CPU).")
    ] = 0,
    keep_checkpoints: Annotated[
        bool, typer.Option(help="Keep the Trainer checkpoints and every configuration's model.")
    ] = False,
    data_dir: DataDir = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune an encoder on GLUE tasks (grid x seeds, best dev epoch kept), optionally with the convexity
    paper's fixes; resumable. Writes HF checkpoints that `probekit extract --model` loads."""
    from probekit.finetune import finetune as run

    result = run(
        model,
        task,
        out,
        seeds=seeds,
        grid=grid.value,
        variants=[v.value for v in variant],
        copy_from=copy_from,
        drop=drop,
        mlm_weight=mlm_weight,
        mlm_warmup=mlm_warmup,
        max_train_samples=max_train_samples,
        max_dev_samples=max_dev_samples,
        epochs=epochs,
        max_steps=max_steps,
        max_length=max_length,
        data_dir=data_dir,
        device=device.value,
        precision=precision.value,
        threads=threads or None,
        keep_checkpoints=keep_checkpoints,
        progress=not quiet,
    )
    print_table(
        [
            {
                "task": r.task,
                "variant": r.variant,
                "seed": r.seed,
                "batch": r.metrics["chosen"]["batch_size"],
                "lr": r.metrics["chosen"]["lr"],
                "epoch": r.metrics["chosen"]["epoch"],
                "metric": r.metrics["metric"],
                "dev %": f"{100 * r.value:.1f}",
                "minutes": f"{r.metrics['wall_s'] / 60:.1f}",
                "status": "done before" if r.skipped else "trained",
                "checkpoint": str(r.path.relative_to(out)) if r.path.is_relative_to(out) else str(r.path),
            }
            for r in result.results
        ],
        title="fine-tuned checkpoints (dev score of the chosen epoch)",
    )
    typer.echo((out / "comparison.md").read_text(encoding="utf-8"))
    typer.echo(f"comparison: {out / 'comparison.csv'}, {out / 'comparison.md'}")

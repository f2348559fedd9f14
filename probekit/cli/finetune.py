"""``probekit finetune``: its options are derived from the fine-tuning configs and every registered variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Model, Quiet, check_paths, print_table, writing
from probekit.cli.options import derive
from probekit.config import split_options
from probekit.finetune import JobOptions, MultitaskOptions, finetune_multitask, option_sources, variant_order
from probekit.finetune import finetune as run_finetune

_VARIANT_HELP = (
    f"Fine-tuning variant ({', '.join(variant_order())}, or all); repeat for several runs; "
    "a+b composes variants in one run (e.g. smart+siamese)."
)


def _task_scores(metrics: dict[str, Any]) -> dict[str, str]:
    """Each task's main dev metric at a multi-task run's chosen epoch."""
    chosen = metrics["chosen"]
    return {t: f"{s['metric']} {100 * chosen[t + '_' + s['metric']]:.1f}" for t, s in metrics["tasks"].items()}


def _sources() -> list:
    return [*option_sources(), ("multi-task fine-tuning", MultitaskOptions)]


@app.command()
@derive(_sources, labelled=False)
def finetune(
    model: Model,
    task: Annotated[
        list[str], typer.Option("--task", "-t", help="GLUE task (cola, rte, sst2, mrpc, stsb...); repeat.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder: OUT/<task>/<variant>/seed<k>/best, comparison.md")],
    variant: Annotated[list[str], typer.Option("--variant", help=_VARIANT_HELP)] = ["plain"],  # noqa: B006 (typer)
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start seeds made with other settings over (removes their folders).")
    ] = False,
    data_dir: DataDir = None,
    quiet: Quiet = False,
    options: dict[str, Any] | None = None,
) -> None:
    """Fine-tune an encoder on GLUE tasks (grid x seeds, best dev epoch kept), optionally with the convexity
    paper's fixes; resumable. Writes HF checkpoints that `probekit extract --model` loads."""
    check_paths(names_or_files={"task": task}, outputs={"out": out}, data_dir=data_dir)
    given, rest = split_options(options or {}, JobOptions)
    job = JobOptions.from_mapping(given)
    multi, rest = split_options(rest, MultitaskOptions)
    mt = MultitaskOptions.from_mapping(multi)
    common = {
        "seeds": job.seeds,
        "variants": variant,
        "data_dir": data_dir,
        "threads": job.threads or None,
        "fresh": fresh,
        "progress": not quiet,
        **rest,
    }
    if mt.multitask:
        with writing(out):
            result = finetune_multitask(model, task, out, task_sampling=mt.task_sampling, **common)
        print_table(
            [
                {
                    "tasks": r.task,
                    "variant": r.variant,
                    "seed": r.seed,
                    "epoch": r.metrics["chosen"]["epoch"],
                    **_task_scores(r.metrics),
                    "status": "done before" if r.skipped else "trained",
                }
                for r in result.seeds
            ],
            title="multi-task checkpoints (dev score of each task at the chosen epoch)",
        )
        typer.echo(f"checkpoints: {out}/multitask-<tasks>/<variant>/seed<k>/best; rows: {out / 'results.parquet'}")
        return
    if multi.get("task_sampling") is not None:
        typer.echo("note: --task-sampling applies with --multitask only", err=True)
    with writing(out):
        result = run_finetune(model, task, out, **common)
    print_table(
        [
            {
                "task": r.task,
                "variant": r.variant,
                "seed": r.seed,
                "batch": r.metrics["chosen"]["batch_size"],
                "lr": f"{r.metrics['chosen']['lr']:g}",
                "epoch": r.metrics["chosen"]["epoch"],
                "dev %": f"{r.metrics['metric']} {100 * r.value:.1f}",
                "min": f"{r.metrics['wall_s'] / 60:.1f}",
                "status": "done before" if r.skipped else "trained",
            }
            for r in result.seeds
        ],
        title="fine-tuned checkpoints (dev score of the chosen epoch)",
    )
    typer.echo((out / "comparison.md").read_text(encoding="utf-8"))
    typer.echo(f"checkpoints: {out}/<task>/<variant>/seed<k>/best")
    typer.echo(f"comparison: {out / 'comparison.csv'}, {out / 'comparison.md'}; rows: {out / 'results.parquet'}")

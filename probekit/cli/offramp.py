"""``probekit offramp``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Device, Model, Quiet, print_table


class Mode(StrEnum):
    frozen = "frozen"
    deebert = "deebert"
    joint = "joint"


@app.command()
def offramp(
    model: Model,
    task: Annotated[str, typer.Option("--task", "-t", help="Task name or alias (e.g. sst2, cola, mrpc, stsb).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.parquet/csv, offramps.pt, ...).")],
    mode: Annotated[
        Mode,
        typer.Option(
            help="frozen: off-ramps on cached states of the frozen encoder; deebert: "
            "two-stage fine-tuning; joint: encoder + all off-ramps."
        ),
    ] = Mode.frozen,
    policies: Annotated[
        str,
        typer.Option(
            help="Comma-separated exit policies: entropy, confidence, patience, lte, pondernet, qexit, fixed (or all)."
        ),
    ] = "all",
    train_n: Annotated[int | None, typer.Option(help="Train on a random subset of this many examples.")] = None,
    dev_n: Annotated[int | None, typer.Option(help="Evaluate on a random subset of this many dev examples.")] = None,
    holdout: Annotated[float, typer.Option(help="Fraction of train held out to fit the learned policies.")] = 0.1,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default 5 frozen, 2 fine-tuning).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size when fine-tuning (deebert, joint).")] = 32,
    head_batch_size: Annotated[int, typer.Option(help="Batch size of off-ramps on fixed states.")] = 128,
    lr: Annotated[float, typer.Option(help="Encoder learning rate (deebert, joint).")] = 3e-5,
    head_lr: Annotated[float, typer.Option(help="Off-ramp learning rate.")] = 1e-3,
    max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens.")] = 128,
    beta: Annotated[float, typer.Option(help="PonderNet/PALBERT: weight of the KL to the geometric prior.")] = 0.5,
    prior_lambda: Annotated[float, typer.Option(help="PALBERT (qexit): lambda_p of the geometric prior.")] = 0.1,
    measure: Annotated[bool, typer.Option(help="Time real early exit against full inference.")] = True,
    measure_n: Annotated[int | None, typer.Option(help="Time on the first N dev examples (default all).")] = None,
    measure_points: Annotated[int, typer.Option(help="Thresholds timed per policy (spread over savings).")] = 5,
    measure_batch_size: Annotated[int, typer.Option(help="Batch size of the batched timing mode.")] = 32,
    measure_threads: Annotated[int, typer.Option(help="CPU threads while timing (0 = torch's default).")] = 1,
    figures: Annotated[
        Path | None, typer.Option(help="Also write the figures (PNG) to this folder (probekit report shows them too).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature caches of frozen mode (default OUT/cache).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of subsampling, initialisation and training order.")] = 0,
    threads: Annotated[
        int, typer.Option(help="CPU threads for the whole run (0 = torch's default; 1 is often faster on a busy CPU).")
    ] = 0,
    device: Device = "auto",
    data_dir: DataDir = None,
    name: Annotated[str | None, typer.Option(help="Model name in results (default: from --model).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow models that ship their own code.")] = False,
    quiet: Quiet = False,
) -> None:
    """Off-ramps at every layer, exit policies (DeeBERT, PABEE, BERxiT, PonderNet/PALBERT) and early-exit savings."""
    from probekit.offramp import PolicyConfig, TrainConfig, run_offramp
    from probekit.offramp.plots import save_figures
    from probekit.offramp.run import summarize

    run = run_offramp(
        model,
        task,
        out,
        mode=mode.value,
        policy_names=policies,
        data_dir=data_dir,
        train_n=train_n,
        dev_n=dev_n,
        holdout=holdout,
        max_length=max_length,
        train=TrainConfig(
            epochs=epochs, batch_size=batch_size, head_batch_size=head_batch_size, lr=lr, head_lr=head_lr
        ),
        policy=PolicyConfig(beta=beta, prior_lambda=prior_lambda),
        measure=measure,
        measure_n=measure_n,
        measure_points=measure_points,
        measure_batch_size=measure_batch_size,
        measure_threads=measure_threads or None,
        device=device,
        name=name,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
        seed=seed,
        threads=threads or None,
        progress=not quiet,
    )
    df = run.results
    paths = []
    if figures is not None:
        stem = f"offramp_{df['task'].iloc[0]}_{df['model'].iloc[0]}_{mode.value}"
        paths = save_figures(df, figures, stem=stem)
    per_layer, best = summarize(df)
    print_table(per_layer, title="metric by exit layer")
    print_table(best, title="best threshold per policy")
    typer.echo(f"results: {out}" + "".join(f"\nfigure: {p}" for p in paths))

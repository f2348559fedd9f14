"""``probekit offramp``: its options are derived from the run's, the training methods' and the exit
policies' config dataclasses (:func:`probekit.offramp.run.option_sources`), so a registered method or
policy brings its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Device, Model, Quiet, check_paths, print_table, writing
from probekit.cli.options import derive
from probekit.offramp.methods import TRAINING_METHODS
from probekit.offramp.policies import EXIT_POLICIES
from probekit.offramp.run import option_sources, run_offramp, summarize
from probekit.paths import slug
from probekit.plot import save_figures


def _choices(registry: Any) -> str:
    return ", ".join(f"{n}: {registry.help(n).rstrip('.')}" for n in registry.names())


@app.command()
@derive(option_sources, exclude=("policies", "unseen_labels"), labelled=False)
def offramp(
    model: Model,
    task: Annotated[str, typer.Option("--task", "-t", help="Task name or alias (e.g. sst2, cola, mrpc, stsb).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Results folder (results.parquet/csv, offramps.safetensors, ...).")
    ],
    mode: Annotated[
        str,
        typer.Option("--mode", "--method", help=f"Off-ramp training method ({_choices(TRAINING_METHODS)})."),
    ] = "frozen",
    policies: Annotated[
        str,
        typer.Option(help=f"Comma-separated exit policies: {', '.join(EXIT_POLICIES.names())} (or all)."),
    ] = "all",
    figures: Annotated[
        Path | None, typer.Option(help="Also write the figures (PNG) to this folder (probekit report shows them too).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature caches of frozen mode (default OUT/cache).")] = None,
    device: Device = "auto",
    data_dir: DataDir = None,
    name: Annotated[str | None, typer.Option(help="Model name in results (default: from --model).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow models that ship their own code.")] = False,
    fresh: Annotated[
        bool, typer.Option(help="Start a fine-tuning over where OUT holds a checkpoint made with other settings.")
    ] = False,
    quiet: Quiet = False,
    *,
    options: dict[str, Any],
) -> None:
    """Off-ramps at every layer, exit policies (DeeBERT, PABEE, BERxiT, PonderNet/PALBERT) and early-exit savings."""
    check_paths(
        names_or_files={"task": task},
        outputs={"out": out, "figures": figures, "cache_dir": cache_dir},
        data_dir=data_dir,
    )
    with writing(out):
        run = _run(
            model,
            task,
            out,
            mode,
            policies,
            data_dir,
            device,
            name,
            cache_dir,
            trust_remote_code,
            fresh,
            quiet,
            options,
        )
    df = run.results
    paths = []
    method = str(df["mode"].iloc[0])
    if figures is not None:
        stem = slug(f"offramp_{df['task'].iloc[0]}_{df['model'].iloc[0]}_{method}")  # names never reach a path
        paths = save_figures(df, figures, stem=stem)
    per_layer, best = summarize(df)
    print_table(per_layer, title="metric by exit layer")
    print_table(best, title="best threshold per policy")
    typer.echo(f"results: {out}" + "".join(f"\nfigure: {p}" for p in paths))


def _run(
    model: str,
    task: str,
    out: Path,
    mode: str,
    policies: str,
    data_dir: Path | None,
    device: str,
    name: str | None,
    cache_dir: Path | None,
    trust_remote_code: bool,
    fresh: bool,
    quiet: bool,
    options: dict[str, Any],
) -> Any:
    return run_offramp(
        model,
        task,
        out,
        mode=mode,
        policies=policies,
        data_dir=data_dir,
        device=device,
        name=name,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
        fresh=fresh,
        progress=not quiet,
        **options,
    )

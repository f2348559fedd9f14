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
from probekit.errors import ParamError
from probekit.offramp.compare import parse_methods, run_comparison
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
        typer.Option(
            "--method",
            "--mode",
            help=f"Off-ramp training method ({_choices(TRAINING_METHODS)}); several, comma-separated (or all), "
            "run each and write the comparison table (OUT/comparison.csv, .md).",
        ),
    ] = "frozen",
    seeds: Annotated[
        str | None,
        typer.Option(help="Comma-separated seeds: one run per method and seed, the table as mean and spread."),
    ] = None,
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
    methods = parse_methods(mode)
    seed_list = _seeds(seeds)
    common = {
        "policies": policies,
        "data_dir": data_dir,
        "device": device,
        "name": name,
        "cache_dir": cache_dir,
        "trust_remote_code": trust_remote_code,
        "fresh": fresh,
        "progress": not quiet,
        **options,
    }
    compare = len(methods) > 1 or seed_list is not None
    with writing(out):
        if compare:
            seed_list = seed_list or [int(common.pop("seed", 0))]
            run = run_comparison(model, task, out, methods, seeds=seed_list, **common)
        else:
            run = run_offramp(model, task, out, mode=methods[0], **common)
    df = run.results
    paths = []
    if figures is not None:
        label = "comparison" if compare else str(df["mode"].iloc[0])
        stem = slug(f"offramp_{df['task'].iloc[0]}_{df['model'].iloc[0]}_{label}")  # names never reach a path
        paths = save_figures(df, figures, stem=stem)
    if compare:
        print_table(
            [
                {
                    "method": r.method,
                    "policy": r.policy,
                    "seeds": r.seeds,
                    r.metric: f"{r.score:.4f}",
                    "full": f"{r.full_score:.4f}",
                    "exp. speed-up": f"{r.expected_speedup:.2f}x",
                    "meas. speed-up": f"{r.measured_speedup:.2f}x",
                }
                for r in run.details["native"].itertuples()
            ],
            title="comparison: each method's own exit policy, threshold chosen on held-out (all: comparison.csv)",
        )
    else:
        per_layer, best = summarize(df)
        print_table(per_layer, title="metric by exit layer")
        print_table(best, title="best threshold per policy")
    typer.echo(f"results: {out}" + "".join(f"\nfigure: {p}" for p in paths))
    if compare:
        typer.echo(f"comparison: {run.paths['comparison']}")


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ParamError("seeds", f"must be comma-separated integers, got {text!r}") from None

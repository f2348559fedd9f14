"""``probekit mlm-probe``: its options are derived from :class:`~probekit.mlm.MLMConfig` and
:class:`~probekit.mlm.MLMRunConfig` (one flag per field)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Device, Model, Quiet, check_paths, print_table, writing
from probekit.cli.extract import DType
from probekit.cli.options import Source, derive
from probekit.mlm import MLMConfig, MLMRunConfig, mlm_probe


def _sources() -> list[Source]:
    return [(MLMConfig.label(), MLMConfig), (MLMRunConfig.label(), MLMRunConfig)]


@app.command("mlm-probe")
@derive(_sources, labelled=False)
def mlm_probe_command(
    model: Model,
    corpus: Annotated[
        list[str],
        typer.Option("--corpus", "-c", help="SQuAD v1.1 JSON, text file (one passage per line) or task name; repeat."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.parquet/csv, checkpoints/).")],
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Annotated[DType, typer.Option(help="Compute dtype of the encoder (heads train in float32).")] = DType.auto,
    name: Annotated[str | None, typer.Option(help="Model name in the results (default: from --model).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow models that ship their own code.")] = False,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over when OUT holds a run with other settings.")
    ] = False,
    quiet: Quiet = False,
    *,
    options: dict[str, Any],
) -> None:
    """Train an MLM head on every layer of a frozen encoder (embedding dropout), score each on held-out text.

    Lower accuracy at naming the unmasked input token = more contextual. One forward pass per batch serves all heads.

    Heads are checkpointed under OUT/checkpoints: re-running the same command resumes (or only re-scores).
    """
    check_paths(names_or_files={"corpus": corpus}, outputs={"out": out}, data_dir=data_dir)
    with writing(out):
        result = mlm_probe(
            model,
            corpus,
            out,
            data_dir=data_dir,
            device=device,
            dtype=dtype.value,
            name=name,
            trust_remote_code=trust_remote_code,
            fresh=fresh,
            progress=not quiet,
            **options,
        )
    if result.sweep is not None:
        print_table(
            [
                {
                    "mask": r.mask_ratio,
                    "dropout": r.dropout_ratio,
                    "acc": f"{r.mean_acc:.4f}",
                    "masked acc": f"{r.mean_masked_acc:.4f}",
                    "criterion": f"{r.criterion:.4f}",
                    "chosen": "*" if r.chosen else "",
                }
                for r in result.sweep.itertuples()
            ],
            title="sweep (validation passages, mean over layers; criterion = mean of unmasked and masked accuracy)",
        )
    table = result.results.pivot_table(index="layer", columns="metric", values="value")
    n = result.results.groupby("layer")["n"].first()
    p = result.probe.config_
    print_table(
        [
            {
                "layer": int(layer),
                "mlm_acc": f"{row['mlm_acc']:.4f}",
                "mlm_top5": f"{row['mlm_top5']:.4f}",
                **({"masked": f"{row['mlm_masked_acc']:.4f}"} if "mlm_masked_acc" in row else {}),
                "tokens": int(n[layer]),
            }
            for layer, row in table.iterrows()
        ],
        title=f"held-out MLM-head accuracy per layer (mask_ratio={p.mask_ratio}, dropout_ratio={p.dropout_ratio}, "
        f"steps={result.probe.steps_})",
    )
    stat = result.results.set_index("metric")
    if "mlm_recovery" in stat.index:
        rec = stat.loc["mlm_recovery"]
        typer.echo(
            f"dip layer (upper half): {int(stat.loc['mlm_dip_layer', 'value'])}; recovery acc(L) - acc(L-1): "
            f"{100 * rec['value']:+.2f} points (95% passage bootstrap [{100 * rec['ci_low']:+.2f}, "
            f"{100 * rec['ci_high']:+.2f}])"
        )
    typer.echo(f"results: {result.out}")

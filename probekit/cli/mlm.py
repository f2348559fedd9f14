"""``probekit mlm-probe``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from probekit.cli import app
from probekit.cli.common import DataDir, Device, Model, Quiet, parse_floats, print_table
from probekit.cli.extract import DType
from probekit.mlm import DEFAULT_DROPOUT_RATIO, DEFAULT_MASK_RATIO


class CorpusFormat(StrEnum):
    auto = "auto"
    squad = "squad"
    text = "text"
    task = "task"


@app.command("mlm-probe")
def mlm_probe(
    model: Model,
    corpus: Annotated[
        list[str],
        typer.Option("--corpus", "-c", help="SQuAD v1.1 JSON, text file (one passage per line) or task name; repeat."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.parquet/csv, checkpoints/).")],
    mask_ratio: Annotated[float, typer.Option(help="Probability that a token is chosen for masking.")] = (
        DEFAULT_MASK_RATIO
    ),
    dropout_ratio: Annotated[
        float, typer.Option(help="Dropout on a chosen token's input embedding: 0 none, 1 all of it (like [MASK]).")
    ] = DEFAULT_DROPOUT_RATIO,
    steps: Annotated[int | None, typer.Option(help="Training steps (batches).", show_default=False)] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Passes over the training windows (default 1).", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per training batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then linear decay).")] = 2e-3,
    max_length: Annotated[int, typer.Option(help="Tokens per window; longer passages are split.")] = 128,
    heldout: Annotated[
        float, typer.Option(help="Held-out passages: a fraction below 1, or a number of passages.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split, the masks, the batch order and the heads.")] = 0,
    sweep_mask_ratios: Annotated[
        str | None,
        typer.Option(help="Sweep these mask ratios (comma-separated), then train the best.", show_default=False),
    ] = None,
    sweep_dropout_ratios: Annotated[
        str | None, typer.Option(help="Sweep these dropout ratios (comma-separated).", show_default=False)
    ] = None,
    sweep_steps: Annotated[
        int | None, typer.Option(help="Training steps of each sweep setting (default: --steps).", show_default=False)
    ] = None,
    corpus_format: Annotated[
        CorpusFormat,
        typer.Option(help="How to read --corpus; auto: .json is SQuAD, another file is text, else a task."),
    ] = (CorpusFormat.auto),
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Annotated[DType, typer.Option(help="Compute dtype of the encoder (heads train in float32).")] = DType.auto,
    name: Annotated[str | None, typer.Option(help="Model name in the results (default: from --model).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow models that ship their own code.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train an MLM head on every layer of a frozen encoder (embedding dropout), score each on held-out text.

    Lower accuracy at naming the unmasked input token = more contextual. One forward pass per batch serves all heads.

    Heads are checkpointed under OUT/checkpoints: re-running the same command resumes (or only re-scores).
    """
    from probekit.mlm import mlm_probe as run

    result = run(
        model,
        corpus,
        out,
        mask_ratio=mask_ratio,
        dropout_ratio=dropout_ratio,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_length=max_length,
        heldout=heldout,
        seed=seed,
        sweep_mask_ratios=parse_floats(sweep_mask_ratios, "--sweep-mask-ratios", "0.15,0.3"),
        sweep_dropout_ratios=parse_floats(sweep_dropout_ratios, "--sweep-dropout-ratios", "0.3,0.6,1"),
        sweep_steps=sweep_steps,
        corpus_format=corpus_format.value,
        data_dir=data_dir,
        device=device,
        dtype=dtype.value,
        name=name,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    if result.sweep is not None:
        print_table(
            [
                {
                    "mask_ratio": r.mask_ratio,
                    "dropout_ratio": r.dropout_ratio,
                    "mean_acc": f"{r.mean_acc:.4f}",
                    "mean_masked_acc": f"{r.mean_masked_acc:.4f}",
                    "criterion": f"{r.criterion:.4f}",
                    "chosen": "*" if r.chosen else "",
                }
                for r in result.sweep.itertuples()
            ],
            title="sweep (held-out; criterion = mean of unmasked and masked accuracy)",
        )
    table = result.results.pivot_table(index="layer", columns="metric", values="value")
    n = result.results.groupby("layer")["n"].first()
    p = result.probe
    print_table(
        [
            {
                "layer": int(layer),
                "mlm_acc": f"{row['mlm_acc']:.4f}",
                "mlm_top5": f"{row['mlm_top5']:.4f}",
                "tokens": int(n[layer]),
            }
            for layer, row in table.iterrows()
        ],
        title=f"held-out MLM-head accuracy per layer (mask_ratio={p.mask_ratio}, dropout_ratio={p.dropout_ratio}, "
        f"steps={p.steps_})",
    )
    typer.echo(f"results: {result.out}")

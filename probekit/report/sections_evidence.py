"""Report sections that weigh the evidence: MDL codelengths beside accuracy, and the paired bootstrap tests
of the convexity drop and of fine-tuned minus pre-trained deltas (:mod:`probekit.stats`)."""

from __future__ import annotations

import pandas as pd

from probekit import plot, stats
from probekit.errors import ProbekitError
from probekit.report.base import Context, FigureItem, Section, TableItem, describe, section


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.1f}"


def _p(v: float) -> str:
    return "" if pd.isna(v) else (f"{v:.2g}" if v >= 1e-3 else "<0.001")


def is_mdl(probe: pd.Series) -> pd.Series:
    """Which curves are MDL probes' (``mdl``; with a protocol's block probe ``mdl-senteval``...)."""
    return (probe == "mdl") | probe.astype(str).str.startswith("mdl-")


def mdl_table(ctx: Context) -> pd.DataFrame:
    """Per model, MDL curve, pooling, task and layer: compression, codelength (kbits), the control's, and test
    accuracy of the same (full-train) probe, seeds averaged."""
    rows = ctx.probe[is_mdl(ctx.probe["probe"])]
    keys = ["model", "probe", "pool", "task", "layer"]
    train = rows[rows["split"] == "train"].pivot_table(index=keys, columns="metric", values="value", sort=False)
    test = rows[(rows["split"] == ctx.probe_split) & (rows["metric"] == "acc")].groupby(keys, sort=False)["value"]
    table = train.join(test.mean().rename("acc")).reset_index()
    for col in ("codelength", "control_codelength"):
        if col in table:
            table[col.replace("codelength", "kbits")] = table[col] / 1000
    return table


@section("mdl")
def mdl(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Online codelength (Voita & Titov) per layer: compression heatmap and curves beside accuracy."""
    if ctx.probe.empty or not ((ctx.probe["metric"] == "compression") & is_mdl(ctx.probe["probe"])).any():
        return None
    table = mdl_table(ctx)
    rows = ctx.probe[is_mdl(ctx.probe["probe"]) & (ctx.probe["split"] == "train")]
    items: list[FigureItem | TableItem] = []
    several = rows[["probe", "pool"]].drop_duplicates()
    for probe, pool in several.itertuples(index=False):
        suffix = "" if len(several) == 1 else f"-{probe}-{pool}".replace("-mdl-", "-")
        one = rows[(rows["probe"] == probe) & (rows["pool"] == pool)]
        named = "" if probe == "mdl" else f" ({probe})"
        items.append(
            FigureItem(
                f"mdl-compression-heatmap{suffix}",
                plot.heatmap(results, split="train", metric="compression", probe=probe, pool=pool),
                f"MDL compression{named} (uniform codelength N log2 K over the online codelength) per layer and "
                f"task; 1 = no compression. {plot.sentence(describe(one))}.",
            )
        )
        items.append(
            FigureItem(
                f"mdl-compression-curves{suffix}",
                plot.curves(results, split="train", metric="compression", probe=probe, pool=pool, baselines=False),
                f"MDL compression{named} over layers, one panel per task.",
            )
        )
    peaks = []
    for (model, probe, pool, task), one in table.groupby(["model", "probe", "pool", "task"], sort=False):
        by_acc = int(one.loc[one["acc"].idxmax(), "layer"]) if one["acc"].notna().any() else None
        peaks.append(
            {
                "model": model,
                "probe": probe,
                "pool": pool,
                "task": task,
                "peak by compression": int(one.loc[one["compression"].idxmax(), "layer"]),
                "peak by accuracy": by_acc,
                "max compression": round(float(one["compression"].max()), 2),
                "control compression (max)": round(
                    float(one.get("control_compression", pd.Series([float("nan")])).max()), 2
                ),
            }
        )
    peak_table = pd.DataFrame(peaks)
    agree = int((peak_table["peak by compression"] == peak_table["peak by accuracy"]).sum())
    items.append(TableItem("mdl-peaks", peak_table, "Peak layer by MDL compression and by test accuracy."))
    display = table.copy()
    for col in display.columns:
        if col in ("compression", "control_compression") or col.endswith("kbits"):
            display[col] = display[col].round(2)
        elif col == "acc":
            display[col] = display[col].map(_pct)
    keep = [c for c in ("model", "probe", "pool", "task", "layer", "kbits", "compression", "control_kbits",
                        "control_compression", "acc") if c in display]  # fmt: skip
    items.append(
        TableItem(
            "mdl",
            table,
            "Online codelength (kbits) and compression per layer, the shuffled-label control's, and the test "
            "accuracy of the full-train probe.",
            display=display[keep],
            max_rows=200,
        )
    )
    summary = [
        f"MDL: the peak layer by compression matches the peak by accuracy for {agree} of {len(peak_table)} curves."
    ]
    return Section(
        "MDL probes: online codelength",
        items,
        intro="How many bits the train labels take with the probe learning online (Voita & Titov, 2020); "
        f"compression = uniform / online. Peak by compression = peak by accuracy for {agree} of {len(peak_table)}.",
        summary=summary,
    )


@section("convexity-paired")
def convexity_paired(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Paired bootstrap of acc(peak) - acc(last) on the same test sentences, seeds combined, Holm across tasks."""
    preds = ctx.predictions
    split = ctx.probe_split or "test"
    if not preds or not all(split in p.correct for p in preds):
        return None
    table = stats.convexity_tests(preds, split=split)
    display = pd.DataFrame(
        {
            "model": table["model"],
            "probe": table["probe"],
            "task": table["task"],
            "peak (dev)": table["peak_layer"].astype(str) + " / " + table["layers"].astype(str),
            "peak %": table["peak"].map(_pct),
            "last %": table["last"].map(_pct),
            "drop": table["drop"].map(lambda v: plot.signed(100 * v)),
            "95% CI": [
                f"[{100 * a:.1f}, {100 * b:.1f}]" for a, b in zip(table["ci_low"], table["ci_high"], strict=True)
            ],
            "p": table["p"].map(_p),
            "p (Holm)": table["p_holm"].map(_p),
            "peak share": table["peak_share"].map(lambda v: f"{100 * v:.0f}%"),
            "seeds": table["seeds"],
        }
    )
    summary = []
    for (model, probe, pool), one in table.groupby(["model", "probe", "pool"], sort=False, dropna=False):
        summary.append(
            f"- {model} ({probe}, {pool}): {int(one['significant'].sum())} of {len(one)} tasks drop significantly "
            f"from the dev-chosen peak to the last layer ({split}; paired bootstrap, Holm across tasks, alpha 0.05)"
        )
    return Section(
        "Convexity: paired tests",
        [
            TableItem(
                "convexity-paired",
                table.assign(argmax_share=table["argmax_share"].map(str)),
                f"Peak layer chosen on dev (mean over seeds); the drop to the last layer on the {split} sentences "
                f"with its 95% paired-bootstrap interval ({stats.N_BOOT:,} resamples of sentences, seeds averaged "
                "in each), two-sided p and Holm-adjusted p across tasks; peak share: how often the peak layer is "
                f"the {split} argmax in the resamples.",
                display=display,
                highlight=table["significant"].astype(bool),
                max_rows=200,
            )
        ],
        intro="The peak and the last layer are scored on the same sentences, so the drop is tested paired.",
        summary=summary,
    )


@section("deltas-paired")
def deltas_paired(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Paired tests of fine-tuned minus pre-trained accuracy per layer (same sentences, two models)."""
    base = ctx.baseline_predictions
    if not base:
        return None
    base_models = {p.model for p in base}
    tuned = [p for p in ctx.predictions if p.model not in base_models]
    split = ctx.probe_split or "test"
    if not tuned:
        return None
    try:
        table = stats.delta_tests(tuned, base, split=split)
    except ProbekitError:
        return None
    counts = table.groupby(["model", "probe", "pool"], sort=False, dropna=False).agg(
        layers=("layer", "size"), up=("significant", lambda s: int((s & (table.loc[s.index, "delta"] > 0)).sum())),
        down=("significant", lambda s: int((s & (table.loc[s.index, "delta"] < 0)).sum())),
    )  # fmt: skip
    summary = [
        f"- {m} ({pr}, {po}): of {r.layers} (task, layer) cells, {r.up} rise and {r.down} fall significantly "
        "(paired bootstrap, Holm)"
        for (m, pr, po), r in counts.iterrows()
    ]
    return Section(
        "Fine-tuned vs pre-trained: paired tests",
        [
            TableItem(
                "deltas-paired",
                table,
                f"Fine-tuned minus pre-trained {split} accuracy per task and layer on the same sentences: 95% paired "
                "bootstrap interval, p and Holm-adjusted p across the layers and tasks of each model.",
                highlight=table["significant"].astype(bool),
                max_rows=200,
            )
        ],
        summary=summary,
    )


@section("mlm-dip")
def mlm_dip(results: pd.DataFrame, ctx: Context) -> Section | None:
    """The MLM-head curve's dip among the upper layers and the recovery at the last one, per model."""
    rows = ctx.sources("mlm-probe")
    stat = rows[rows["metric"].isin(["mlm_dip_layer", "mlm_recovery"])]
    if stat.empty:
        return None
    keys = ["model", "task", "seed"]
    dip = stat[stat["metric"] == "mlm_dip_layer"].set_index(keys)["value"]
    rec = stat[stat["metric"] == "mlm_recovery"].set_index(keys)[["value", "ci_low", "ci_high"]]
    table = rec.join(dip.rename("dip_layer")).reset_index().rename(columns={"value": "recovery"})
    last = rows[rows["metric"] == "mlm_acc"].groupby(keys)["layer"].max().rename("last_layer")
    table = table.join(last, on=keys)
    table["recovers"] = table["ci_low"] > 0
    display = pd.DataFrame(
        {
            "model": table["model"],
            "corpus": table["task"],
            "dip layer (upper half)": table["dip_layer"].astype(int).astype(str)
            + " / "
            + table["last_layer"].astype(str),
            "recovery acc(L) - acc(L-1)": table["recovery"].map(lambda v: plot.signed(100 * v)),
            "95% CI (passages)": [
                f"[{100 * a:+.2f}, {100 * b:+.2f}]" for a, b in zip(table["ci_low"], table["ci_high"], strict=True)
            ],
            "recovers?": table["recovers"].map({True: "yes", False: "no"}),
        }
    )
    summary = [
        f"- {r.model} ({r.task}): dip at layer {int(r.dip_layer)} of {r.last_layer}; recovery "
        f"{plot.signed(100 * r.recovery)} points [{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"
        for r in table.itertuples()
    ]
    return Section(
        "MLM-head probe: dip and recovery",
        [
            TableItem(
                "mlm-dip",
                table,
                "The layer of the lowest unmasked MLM-head accuracy among the upper half of the layers, and the "
                "recovery at the last layer with its 95% passage-bootstrap interval (the convexity paper's claim: "
                "a minimum at the penultimate layer and a rise at the last).",
                display=display,
                highlight=table["recovers"].astype(bool),
            )
        ],
        summary=summary,
    )

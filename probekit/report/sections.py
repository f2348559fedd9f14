"""The report's sections, in page order. Each returns None when the results lack its data.

To add a section: write ``@section("id") def my_section(results, ctx) -> Section | None`` here.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from matplotlib.figure import Figure

from probekit import analysis, plot
from probekit.offramp.compare import comparison_table, offramp_peaks
from probekit.paths import slug
from probekit.report.base import Context, FigureItem, Section, TableItem, describe, section


def _figure_name(name: str, configs: list, probe: object, pool: object) -> str:
    """``heatmap`` when the results hold one probe and pooling (a stable name to link to), else ``heatmap-mlp-cls``."""
    return name if len(configs) == 1 else _slug(name, probe, pool)


def _slug(*parts: object) -> str:
    return "-".join(slug(str(p).replace("/", "_").replace(" ", "_")) for p in parts if pd.notna(p))


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.1f}"


def _pp(v: float) -> str:
    return plot.signed(100 * v)


def _what(ctx: Context) -> str:
    """'probe accuracy (test)'."""
    return plot.metric_label(ctx.metric, ctx.probe_split)


def _config_rows(ctx: Context, probe: object = None, pool: object = None) -> pd.DataFrame:
    """Probe rows of the report's split, of one probe and pooling when given."""
    rows = ctx.probe[ctx.probe["split"] == ctx.probe_split]
    if probe is not None:
        rows = rows[analysis.same(rows["probe"], probe)]
    return rows[analysis.same(rows["pool"], pool)] if pool is not None else rows


def _max_layer(rows: pd.DataFrame) -> int | str:
    """The deepest layer a model's rows name (blank for rows with no layer, as fine-tuning's)."""
    layers = pd.to_numeric(rows["layer"]).dropna()
    return int(layers.max()) if len(layers) else ""


@section("overview")
def overview(results: pd.DataFrame, ctx: Context) -> Section:
    """The models in the report and what was measured on each."""
    rows = []
    for model in ctx.models:
        one = results[results["model"] == model]
        fp = one["model_fingerprint"].dropna()
        rows.append(
            {
                "model": model,
                "fine-tuned on": ctx.finetune_tasks.get(model, ""),
                "role": "baseline" if ctx.baseline is not None and model in set(ctx.baseline["model"]) else "",
                "analyses": ", ".join(map(str, pd.unique(one["source"].dropna()))),
                "tasks": one["task"].nunique(),
                "layers": _max_layer(one),
                "probes": ", ".join(map(str, pd.unique(one["probe"].dropna()))),
                "pooling": ", ".join(map(str, pd.unique(one["pool"].dropna()))),
                "seeds": one["seed"].nunique(),
                "fingerprint": str(fp.iloc[0])[:12] if len(fp) else "",
            }
        )
    table = pd.DataFrame(rows)
    inputs = ", ".join(f"`{p}`" for p in ctx.inputs)
    return Section(
        "Overview",
        [TableItem("models", table, "Models in this report, with what was measured on each.")],
        intro=f"{len(ctx.models)} model(s), {results['task'].nunique()} task(s); probe scores on the "
        f"{ctx.probe_split or '-'} split.",
        summary=[f"Models: {', '.join(ctx.models)}.", f"Inputs: {inputs}." if inputs else ""],
    )


def _per_config(ctx: Context, name: str, draw: Callable[..., Figure], says: Callable[[pd.DataFrame], str]) -> list:
    """One figure per probe and pooling: ``draw(results, split=, metric=, probe=, pool=)``, captioned ``says(rows)``."""
    items, configs = [], plot.configs(ctx.probe)
    for probe, pool in configs:
        rows = _config_rows(ctx, probe, pool)
        fig = draw(ctx.probe, split=ctx.probe_split, metric=ctx.metric, probe=probe, pool=pool)
        items.append(
            FigureItem(_figure_name(name, configs, probe, pool), fig, f"{says(rows)} {plot.sentence(describe(rows))}.")
        )
    return items


@section("probing")
def probing(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Heatmaps of the probe score by layer and task, one panel per model."""
    if ctx.probe.empty:
        return None
    says = (
        f"{plot.sentence(_what(ctx))} in percent for each layer (rows) and task (columns), one panel per model; the "
        "outlined bold cell is each task's peak layer and colours run from each task's lowest to its highest value."
    )
    items = _per_config(ctx, "heatmap", plot.heatmap, lambda rows: says)
    return Section(
        "Probing results by layer", items, intro="Where in the network each property is most linearly decodable."
    )


@section("curves")
def curves(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Per-task curves of the probe score over layers, with bands and the control/majority baselines."""
    if ctx.probe.empty:
        return None

    def says(rows: pd.DataFrame) -> str:
        bands = plot.band_description(analysis.seed_summary(rows, ctx.probe_split, ctx.metric))
        return (
            f"{plot.sentence(_what(ctx))} over layers, one panel per task and one colour per model ({bands}; "
            "dashed: control task, dotted: majority class; dot: peak)."
        )

    return Section("Layer curves", _per_config(ctx, "curves", plot.curves, says))


@section("convexity")
def convexity(results: pd.DataFrame, ctx: Context) -> Section | None:
    """The convexity table: peak layer, peak and last scores, the drop and whether it exceeds its uncertainty."""
    table = ctx.convexity
    if table is None:
        return None
    display = pd.DataFrame(
        {
            "model": table["model"],
            "probe": table["probe"],
            "pool": table["pool"],
            "task": table["task"],
            "peak layer": table["peak_layer"].astype(str) + " / " + table["layers"].astype(str),
            "peak %": table["peak"].map(_pct),
            "last %": table["last"].map(_pct),
            "drop (points)": table["drop"].map(_pp),
            "uncertainty": table["uncertainty"].map(_pp).str.lstrip("+"),
            "basis": table["basis"],
            "real?": table["significant"].map({True: "yes", False: "no"}).fillna("unknown"),
            "seeds": table["seeds"],
        }
    )
    convex = int((table["drop"] > 0).sum())
    real = int(table["significant"].fillna(False).sum())
    summary = [
        f"Convexity ({ctx.metric}, {ctx.probe_split}): {convex} of {len(table)} curves peak before the last layer; "
        f"the drop is larger than its uncertainty for {real}.",
        "",
        _markdown_peaks(table),
    ]
    return Section(
        "Convexity: peak layer and drop to the last layer",
        [
            *_offramp_layer_items(results, ctx),
            TableItem(
                "convexity",
                table,
                f"Per model and task: the peak layer (of the last), peak and last-layer "
                f"{_what(ctx)}, the drop and "
                "whether it is larger than its uncertainty (Wilson: the 95% intervals do not overlap; seeds: 95% "
                f"t-interval of the per-seed drop). {plot.sentence(describe(_config_rows(ctx), models=False))}.",
                display=display,
                highlight=table["significant"].fillna(False).astype(bool),
                max_rows=200,
            ),
        ],
        intro=f"{convex} of {len(table)} curves peak before the last layer; for {real} the drop is larger than "
        "its uncertainty (highlighted).",
        summary=summary,
    )


def _offramp_layer_items(results: pd.DataFrame, ctx: Context) -> list[FigureItem | TableItem]:
    """Beside the probing curves: each training method's off-ramp score at every exit layer, and its peak."""
    ramps = ctx.sources("offramp")
    if ramps.empty:
        return []
    peaks = offramp_peaks(results)
    return [
        FigureItem(
            "offramp-layer-curves",
            plot.offramp_curves(results),
            "Off-ramp accuracy curves: the task score when every example exits at a layer, per training method "
            f"(the off-ramps' counterpart of the probing curves); {describe(ramps)}.",
        ),
        TableItem(
            "offramp-peaks",
            peaks,
            "Per training method: the off-ramp layer that scores best, its score, the last layer's and the drop.",
            display=peaks.round(4),
            max_rows=60,
        ),
    ]


def _markdown_peaks(table: pd.DataFrame) -> str:
    """Task x model Markdown table of 'peak layer (drop, * = real)'."""
    cell = table.apply(
        lambda r: f"L{r['peak_layer']} ({_pp(r['drop'])}{'*' if r['significant'] is True else ''})", axis=1
    )
    grid = table.assign(cell=cell).pivot_table(
        index="task", columns="model", values="cell", aggfunc="first", sort=False
    )
    head = "| task | " + " | ".join(map(str, grid.columns)) + " |"
    lines = [head, "|" + "---|" * (len(grid.columns) + 1)]
    lines += [
        f"| {task} | " + " | ".join(str(v) if pd.notna(v) else "" for v in row) + " |" for task, row in grid.iterrows()
    ]
    return (
        "\n".join(lines) + "\n\nCells: peak layer (drop to the last layer in points; * = larger than its uncertainty)."
    )


@section("deltas")
def deltas(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Fine-tuned minus pre-trained probe scores per layer and task, and the fine-tuning-task grid."""
    d = ctx.deltas
    if d is None:
        return None
    baseline = str(d["baseline"].iloc[0])
    items: list[FigureItem | TableItem] = []
    configs = analysis.configs(d)
    for probe, pool in configs:
        rows = _config_rows(ctx, probe, pool)
        items.append(
            FigureItem(
                _figure_name("deltas", configs, probe, pool),
                plot.delta_heatmap(d, probe=probe, pool=pool),
                f"Fine-tuned minus pre-trained ({baseline}) {_what(ctx)} in points on each layer and task, one panel "
                f"per fine-tuned model (green: higher after fine-tuning, red: lower). {plot.sentence(describe(rows))}.",
            )
        )
        if d["finetune_task"].notna().any():
            one = d[analysis.same(d["probe"], probe) & analysis.same(d["pool"], pool)]
            items.append(
                FigureItem(
                    _figure_name(f"finetune-grid-top{ctx.top}", configs, probe, pool),
                    plot.finetune_grid(d, top=ctx.top, probe=probe, pool=pool),
                    f"Change in {_what(ctx)} (points) by fine-tuning task (rows) and probing task (columns), mean "
                    f"over the {ctx.top} highest layers and over models fine-tuned on the same task; {probe} probe, "
                    f"{pool} pooling, baseline {baseline}.",
                )
            )
            items.append(
                FigureItem(
                    _figure_name("finetune-grid-layers", configs, probe, pool),
                    plot.finetune_grid(d, probe=probe, pool=pool),
                    f"As above, one heatmap per layer ({one['model'].nunique()} fine-tuned models, baseline "
                    f"{baseline}).",
                )
            )
    top = analysis.top_mean(d, ctx.top)
    top[["probe", "pool"]] = top[["probe", "pool"]].astype(object).fillna("-")  # pivot_table drops missing keys
    per_model = top.pivot_table(index=["model", "probe", "pool"], columns="task", values="delta", sort=False)
    items.append(
        TableItem(
            "deltas",
            d,
            f"Mean change (points) over the {ctx.top} highest layers per fine-tuned model and task; the CSV holds "
            "every layer, probe and pooling.",
            display=per_model.map(_pp).reset_index(),
        )
    )
    summary = [f"Change after fine-tuning, vs {baseline} (mean over the {ctx.top} highest layers, in points):", ""]
    for (model, probe, pool), row in per_model.iterrows():
        moves = [f"largest rise {row.idxmax()} ({_pp(row.max())})"] if row.max() > 0 else []
        moves += [f"largest fall {row.idxmin()} ({_pp(row.min())})"] if row.min() < 0 else []
        summary.append(
            f"- {model} ({probe}, {pool}): mean {_pp(row.mean())} over tasks; {', '.join(moves) or 'no task moved'}"
        )
    if d["finetune_task"].isna().all():
        summary.append("\nThe fine-tuning tasks are unknown (pass --finetune-task MODEL=TASK for the task grid).")
    return Section(
        f"Fine-tuned vs pre-trained ({baseline})",
        items,
        summary=summary,
        intro="How fine-tuning changed what each layer encodes, matched on task, layer, probe, pooling, data and seed.",
    )


@section("mlm")
def mlm(results: pd.DataFrame, ctx: Context) -> Section | None:
    """MLM-head probe accuracy per layer (how contextual each layer is)."""
    rows = ctx.sources("mlm-probe")
    if rows.empty:
        return None
    table = rows.groupby(["model", "task", "metric", "layer"], sort=False)["value"].agg(["mean", "std", "size"])
    return Section(
        "MLM-head probe",
        [
            FigureItem(
                "mlm-curves",
                plot.mlm_curves(results),
                "Accuracy (solid top-1, dashed top-5) of an MLM head trained on each layer (embedding dropout) "
                "at naming each held-out, unmasked input token; lower = more contextual. One panel per corpus, "
                f"one colour per model; {describe(rows)}.",
            ),
            TableItem(
                "mlm",
                table.reset_index(),
                "MLM-head probe accuracy per layer (mean over seeds).",
                display=table.reset_index().round(4),
                max_rows=40,
            ),
        ],
        intro="How much of the output-layer vocabulary space each layer already lives in.",
    )


@section("offramp")
def offramp(results: pd.DataFrame, ctx: Context) -> Section | None:
    """Off-ramp quality per exit layer, exit policies' quality against savings."""
    ramps, policy = ctx.sources("offramp"), ctx.sources("exit-policy")
    if ramps.empty and policy.empty:
        return None
    items: list[FigureItem | TableItem] = []
    if len(ramps):
        items.append(
            FigureItem(
                "offramp-curves",
                plot.offramp_curves(results),
                f"Task quality when every example exits at a given layer, per training mode; {describe(ramps)}.",
            )
        )
    quality = policy[policy["metric"] != "exit_fraction"] if len(policy) else policy
    if len(quality) and "expected_saving" in quality and quality["expected_saving"].notna().any():
        items.append(
            FigureItem(
                "quality-vs-saving",
                plot.quality_vs_saving(results),
                "Quality against expected compute saving for every exit policy over its thresholds "
                f"(dashed: full model); {describe(quality)}.",
            )
        )
    if len(quality) and quality["mode"].nunique() > 1:
        items.append(
            FigureItem(
                "methods-vs-saving",
                plot.methods_vs_saving(results),
                "Every training method with its own exit policy: quality against expected compute saving, mean "
                "over seeds with +-1 s.d.; the ring is the threshold chosen on the held-out split; "
                f"{describe(quality)}.",
            )
        )
        table = comparison_table(results, native_only=True)
        items.append(
            TableItem(
                "offramp-comparison",
                table,
                "The comparison table (PALBERT's): per task and method, the dev score at the threshold chosen on "
                "the held-out split and the expected and measured (batch size 1) speed-ups, mean and s.d. over "
                "seeds; plain fine-tuning is DeeBERT's stage 1.",
                display=table.round(4),
                max_rows=60,
            )
        )
    if len(policy) and (policy["metric"] == "exit_fraction").any():
        items.append(
            FigureItem(
                "exit-histograms",
                plot.exit_histograms(results),
                "Fraction of examples leaving at each layer, per policy and threshold; "
                f"{describe(policy[policy['metric'] == 'exit_fraction'], models=True)}.",
            )
        )
    if len(quality) and "measured_saving" in quality and quality["measured_saving"].notna().any():
        items.append(
            FigureItem(
                "saving-calibration",
                plot.saving_calibration(results),
                f"Expected (from exit layers) against measured (wall-clock) compute saving; {describe(quality)}.",
            )
        )
    if len(quality):
        cols = [
            c
            for c in (
                "model",
                "task",
                "mode",
                "policy",
                "threshold",
                "metric",
                "value",
                "mean_exit_layer",
                "expected_saving",
                "measured_saving",
            )
            if c in quality.columns
        ]
        items.append(
            TableItem(
                "exit-policies",
                quality[cols],
                "Exit policies: quality and savings per threshold.",
                display=quality[cols].round(4),
                max_rows=40,
            )
        )
    return Section(
        "Off-ramps and early exit",
        items,
        intro="What an exit after each layer would cost in quality, and what each policy saves.",
    )


@section("finetune")
def finetune(results: pd.DataFrame, ctx: Context) -> Section | None:
    """The fine-tuning comparison, from the rows ``probekit finetune`` writes (``source="finetune"``)."""
    rows = ctx.sources("finetune")
    if rows.empty or "chosen" not in rows.columns:
        return None
    chosen = rows[rows["chosen"].astype("boolean").fillna(False).to_numpy()]
    task_col = "finetune_task" if "finetune_task" in rows.columns else "task"
    table = (
        chosen.groupby([task_col, "mode", "metric"], sort=False)["value"]
        .agg(mean="mean", std="std", seeds="size")
        .reset_index()
        .rename(columns={task_col: "task", "mode": "variant"})
    )
    display = table.assign(
        mean=[_pct(v) for v in table["mean"]],
        std=["" if pd.isna(v) else f"{100 * v:.1f}" for v in table["std"]],
    )
    items: list[FigureItem | TableItem] = [
        TableItem(
            "finetune",
            table,
            "Dev score of the chosen configuration and epoch per GLUE task and fine-tuning variant "
            "(mean and standard deviation over seeds, x100).",
            display=display,
        )
    ]
    if "epoch" in rows.columns and rows["epoch"].notna().any():
        items.append(
            FigureItem(
                "finetune-epochs",
                plot.finetune_epochs(rows),
                "Dev score after each epoch of every configuration, per task and variant (one line per "
                "configuration and seed; the chosen one bold).",
            )
        )
    return Section(
        "Fine-tuning",
        items,
        intro="How each fine-tuning method scores on its own task (the comparison of the convexity paper's fixes).",
        summary=[
            f"- {r.task} / {r.variant}: {r.metric} {_pct(r.mean)} ({r.seeds} seed(s))" for r in table.itertuples()
        ],
    )

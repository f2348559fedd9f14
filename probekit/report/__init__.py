"""``probekit report``: one self-contained HTML page (plus PNG/SVG figures, CSV tables, summary.md).

::

    from probekit.report import build_report
    build_report(["runs/minilm", "runs/minilm-cola"], "reports/cola", baseline="runs/minilm",
                 finetune_tasks={"minilm-cola": "cola"})

The page is made of sections (:mod:`probekit.report.sections`), each shown only when the
results hold its data. The report folder is written next to its destination and renamed into
place when complete; an existing folder is replaced only if it is a probekit report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from probekit import analysis
from probekit._version import __version__
from probekit.config import Config, option
from probekit.errors import ProbekitError
from probekit.io import remove_tree, replace_dir, write_json
from probekit.report import sections as _sections  # noqa: F401  (registers the sections)
from probekit.report import sections_evidence as _evidence  # noqa: F401  (MDL, the paired tests: after them)
from probekit.report import study as _study  # noqa: F401  (registers its section, after those)
from probekit.report.base import SECTIONS, Context, FigureItem, Section, TableItem, section
from probekit.report.render import page_html, save_figure, summary_markdown
from probekit.results import load_results

__all__ = [
    "SECTIONS",
    "Context",
    "FigureItem",
    "ReportConfig",
    "Section",
    "TableItem",
    "build_report",
    "make_sections",
    "section",
]

MARKER = "report.json"


@dataclass(frozen=True)
class ReportConfig(Config):
    """What a report shows (``probekit report`` options, a suite's [report] table)."""

    component = "the report"
    split: str | None = option(None, "Probe split to report (default: test, else dev).")
    metric: str = option("acc", "Probe metric: acc, control_gap, control_acc.")
    top: int = option(4, "Highest layers averaged in the fine-tuning grid.", ge=1)
    title: str | None = option(None, "Page title (default: from the output folder).")


Results = pd.DataFrame | str | Path | Sequence[str | Path]


def _folders(results: Results) -> list[str]:
    """The input paths of results given as paths (where their stored predictions are looked for)."""
    if isinstance(results, pd.DataFrame):
        return []
    return [str(p) for p in ([results] if isinstance(results, (str, Path)) else results)]


def _load(results: Results) -> tuple[pd.DataFrame, list[str]]:
    if isinstance(results, pd.DataFrame):
        return results, ["<DataFrame>"]
    paths = [results] if isinstance(results, (str, Path)) else list(results)
    if not paths:
        raise ProbekitError("no results given")
    return load_results(paths), [str(p) for p in paths]


def make_context(
    results: Results,
    baseline: Results | None = None,
    finetune_tasks: Mapping[str, str] | None = None,
    split: str | None = None,
    metric: str = "acc",
    top: int = 4,
    title: str | None = None,
    finetune_methods: Mapping[str, str] | None = None,
) -> Context:
    """Load the inputs and put the baseline model first, ready for :func:`make_sections`."""
    ReportConfig(split=split, metric=metric, top=top, title=title)  # checks the options
    df, inputs = _load(results)
    if df.empty:
        raise ProbekitError(f"no results in {', '.join(inputs)}")
    base = None
    if baseline is not None:
        base, base_inputs = _load(baseline)
        if analysis.probe_rows(base).empty:
            raise ProbekitError(f"the baseline {', '.join(base_inputs)} has no probe results (source='probe')")
        inputs += [f"{p} (baseline)" for p in base_inputs]
        df = pd.concat([base, df], ignore_index=True)
        df = df.drop_duplicates(ignore_index=True)  # the baseline may also be among the results
    return Context(
        results=df,
        baseline=base,
        finetune_tasks=analysis.finetune_tasks_of(df, finetune_tasks),
        finetune_methods=dict(finetune_methods or {}),
        split=split,
        metric=metric,
        top=top,
        title=title or "probekit report",
        inputs=inputs,
        prediction_paths=_folders(results) + (_folders(baseline) if baseline is not None else []),
        baseline_prediction_paths=_folders(baseline) if baseline is not None else [],
    )


def make_sections(ctx: Context) -> list[Section]:
    """Run every registered section; keep those with something to show."""
    found = []
    for name, fn in SECTIONS.items():
        s = fn(ctx.results, ctx)
        if s is not None:
            s.id = s.id or name
            found.append(s)
    if not any(s.id != "overview" for s in found):
        raise ProbekitError(
            "the results hold nothing to report: no probe (source='probe'), MLM-head probe or "
            "off-ramp rows; run `probekit probe` first"
        )
    return found


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ProbekitError(f"{out} exists and is not a probekit report; choose another --out (it would be replaced)")


def write_report(ctx: Context, sections: list[Section], out: str | Path) -> Path:
    """Write the report folder ``out`` atomically (built in a temporary folder, then renamed)."""

    out = Path(out)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        rendered, files = {}, ["index.html", "summary.md"]
        for s in sections:
            for item in s.items:
                if isinstance(item, FigureItem):
                    if item.name in rendered:
                        raise ValueError(f"two report figures are named {item.name!r}")
                    rendered[item.name] = save_figure(item, tmp / "figures")
                    files += [f"figures/{item.name}.png", f"figures/{item.name}.svg"]
                else:
                    item.frame.to_csv(tmp / f"{item.name}.csv", index=False)
                    files.append(f"{item.name}.csv")
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        meta = f"Made {when} by probekit {__version__} from {', '.join(f'`{p}`' for p in ctx.inputs)}."
        (tmp / "index.html").write_text(page_html(ctx.title, meta, sections, rendered), encoding="utf-8")
        (tmp / "summary.md").write_text(summary_markdown(ctx.title, meta, sections, files), encoding="utf-8")
        write_json(
            tmp / MARKER,
            {
                "probekit": __version__,
                "created": when,
                "inputs": list(ctx.inputs),
                "split": ctx.probe_split,
                "metric": ctx.metric,
                "models": ctx.models,
                "finetune_tasks": dict(ctx.finetune_tasks),
                "sections": [s.id for s in sections],
                "files": files,
            },
        )
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_tree(tmp)
        raise
    return out


def build_report(
    results: Results,
    out: str | Path,
    baseline: Results | None = None,
    finetune_tasks: Mapping[str, str] | None = None,
    split: str | None = None,
    metric: str = "acc",
    top: int = 4,
    title: str | None = None,
    finetune_methods: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out/index.html``, ``out/figures/*.png|svg``, ``out/*.csv`` and ``out/summary.md``; return ``out``.

    ``results``: results tables (paths, folders or a DataFrame), any number of models side by
    side. ``baseline``: the pre-trained model's results; adds fine-tuned-minus-baseline deltas.
    ``finetune_tasks``: ``{model: GLUE task}`` for the fine-tuning-task grid (else a
    ``finetune_task`` column). ``split``: the probe split (default test, else dev). ``top``:
    layers averaged in the aggregate grid. ``finetune_methods``: ``{model: fine-tuning method}``; adds the
    "which method forgets least" section (per-method deltas, mean absolute delta per layer, convexity).
    """
    ctx = make_context(
        results,
        baseline,
        finetune_tasks,
        split,
        metric,
        top,
        title or f"probekit report: {Path(out).name}",
        finetune_methods=finetune_methods,
    )
    return write_report(ctx, make_sections(ctx), out)

"""What a report is made of: sections of figures and tables, the context they share, the section registry.

A section is a function ``(results, context) -> Section | None`` registered with
:func:`section`; it returns None when its data is absent, so the report shows only what the
results hold. Adding a section is writing one such function in :mod:`probekit.report.sections`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from probekit import analysis
from probekit.errors import ProbekitError
from probekit.probes.predictions import Predictions, load_predictions
from probekit.registry import Registry


@dataclass
class FigureItem:
    """A figure, saved as ``figures/<name>.png`` and ``.svg`` and embedded in the page."""

    name: str
    figure: Figure
    caption: str


@dataclass
class TableItem:
    """A table, saved as ``<name>.csv`` (``frame``) and shown in the page (``display``, default ``frame``)."""

    name: str
    frame: pd.DataFrame
    caption: str
    display: pd.DataFrame | None = None
    highlight: pd.Series | None = None  # rows to emphasise in the page
    max_rows: int = 60


@dataclass
class Section:
    title: str
    items: list[FigureItem | TableItem] = field(default_factory=list)
    intro: str = ""
    summary: list[str] = field(default_factory=list)  # Markdown lines for summary.md
    id: str = ""


@dataclass
class Context:
    """Everything sections share: the inputs, the options and analyses computed once."""

    results: pd.DataFrame  # all results, baseline included (its model first)
    baseline: pd.DataFrame | None = None
    finetune_tasks: Mapping[str, str] = field(default_factory=dict)
    finetune_methods: Mapping[str, str] = field(default_factory=dict)
    """``{model: fine-tuning method}`` (variant slug), for the per-method study; empty when not known."""
    split: str | None = None
    metric: str = "acc"
    top: int = 4
    title: str = "probekit report"
    inputs: Sequence[str] = ()
    prediction_paths: Sequence[str] = ()  # results folders whose predictions/ the paired tests read
    baseline_prediction_paths: Sequence[str] = ()

    @cached_property
    def predictions(self) -> list[Predictions]:
        """Per-sentence correctness stored by ``probekit probe --out`` (empty when there is none)."""
        return load_predictions(self.prediction_paths) if self.prediction_paths else []

    @cached_property
    def baseline_predictions(self) -> list[Predictions]:
        paths = self.baseline_prediction_paths
        return load_predictions(paths) if paths else []

    @cached_property
    def probe(self) -> pd.DataFrame:
        """The probe rows (empty when there are none)."""
        return analysis.probe_rows(self.results) if len(self.results) else self.results.iloc[0:0]

    @cached_property
    def probe_split(self) -> str | None:
        return (self.split or analysis.default_split(self.results)) if len(self.probe) else None

    @cached_property
    def models(self) -> list[str]:
        return list(pd.unique(self.results["model"]))

    @cached_property
    def convexity(self) -> pd.DataFrame | None:
        if self.probe.empty:
            return None
        return analysis.convexity(self.results, self.probe_split, self.metric)

    @cached_property
    def deltas(self) -> pd.DataFrame | None:
        if self.baseline is None:
            return None
        return analysis.deltas(self.results, self.baseline, self.finetune_tasks, self.probe_split, self.metric)

    def sources(self, *names: str) -> pd.DataFrame:
        """Rows of the given ``source`` values."""
        return self.results[self.results["source"].isin(names)]


SectionFn = Callable[[pd.DataFrame, Context], Section | None]
SECTIONS: Registry[SectionFn] = Registry("report section", "section")
"""The registry, in page order: name (its anchor in the page) -> function."""


def section(name: str) -> Callable[[SectionFn], SectionFn]:
    """Register a section function under ``name``; sections appear in registration order."""
    return SECTIONS.register(name)


def _range(values: pd.Series) -> str | None:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return None
    lo, hi = int(v.min()), int(v.max())
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _train_sizes(rows: pd.DataFrame) -> pd.Series:
    found = []
    for s in rows["settings"].dropna().unique() if "settings" in rows.columns else []:
        try:
            d = json.loads(s)
        except (TypeError, ValueError):
            continue
        if isinstance(d, dict):
            found += [d[k] for k in ("n_train", "train_n", "train_size") if isinstance(d.get(k), int)]
    return pd.Series(found, dtype=float)


def _listing(values: Sequence[Any], noun: str) -> str:
    vals = [str(v) for v in values if pd.notna(v)]
    if not vals:
        return ""
    return f"{noun} {vals[0]}" if len(vals) == 1 else f"{noun}s {', '.join(vals)}"


def describe(rows: pd.DataFrame, models: bool = True) -> str:
    """'models a, b; linear probe, mean pooling; n = 1,000 test / 1,000 dev examples per task' for captions."""
    parts = []
    if models:
        parts.append(_listing(list(pd.unique(rows["model"])), "model"))
    probes = [p for p in pd.unique(rows["probe"]) if pd.notna(p)] if "probe" in rows else []
    pools = [p for p in pd.unique(rows["pool"]) if pd.notna(p)] if "pool" in rows else []
    setup = ", ".join(
        x
        for x in (
            f"{'/'.join(map(str, probes))} probe" if probes else "",
            f"{'/'.join(map(str, pools))} pooling" if pools else "",
        )
        if x
    )
    parts.append(setup)
    sizes = []
    train = _range(_train_sizes(rows))
    if train:
        sizes.append(f"{train} train")
    for split in pd.unique(rows["split"]):
        n = _range(rows.loc[rows["split"] == split, "n"]) if "n" in rows else None
        if n:
            sizes.append(f"{n} {split}")
    if sizes:
        parts.append(f"n = {' / '.join(sizes)} examples per task")
    return "; ".join(p for p in parts if p)


def require_results(results: pd.DataFrame) -> None:
    if results is None or results.empty:
        raise ProbekitError("no results to report")

"""``Run``: what every runner returns (``probe``, ``mlm_probe``, ``offramp``, ``finetune``, ``run_suite``).

A runner does only I/O around an estimator: it reads inputs, fits, writes artifacts and
returns the tidy results table, the paths it wrote, the wall time of each stage and, where
there is one, the fitted estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class Run:
    results: pd.DataFrame
    """The tidy rows (:mod:`probekit.results`) this run produced or reused."""
    paths: dict[str, Path] = field(default_factory=dict)
    """What was written, by role: ``out``, ``results``, ``checkpoint``, ``figures``, ..."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage."""
    estimator: Any = None
    """The fitted estimator (a ``LayerwiseProbe``, ``MLMHeadProbe``, ``OffRamps``...), when there is one."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else a runner reports (a sweep table, per-seed results, suite steps)."""

    @property
    def out(self) -> Path | None:
        return self.paths.get("out")

    def __getattr__(self, name: str) -> Any:
        details = self.__dict__.get("details", {})
        if name in details:
            return details[name]
        raise AttributeError(name)

"""In-memory datasets: what every reader returns, whatever the file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probekit.data.registry import Task

SPLITS = ("train", "dev", "test")


@dataclass
class Split:
    """One split: texts (and second texts for sentence pairs) with their labels."""

    texts: list[str]
    labels: np.ndarray
    """Class ids into ``TaskData.label_names`` (int64), or float32 targets for regression."""
    text_pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """A task's splits, read from ``path`` (whose bytes hash to ``sha256``)."""

    task: Task
    path: Path
    sha256: str
    splits: dict[str, Split]
    label_names: list[str] = field(default_factory=list)
    """Label strings in id order, taken from the train split (empty for regression)."""

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def counts(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

"""In-memory datasets: what every reader returns, whatever the file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probekit.data.registry import Task

SPLITS = ("train", "dev", "test")
HELDOUT = "heldout"
"""A part of train set aside by :meth:`TaskData.subsample` (e.g. to fit exit policies)."""


@dataclass
class Split:
    """One split: texts (and second texts for sentence pairs) with their labels."""

    texts: list[str]
    labels: np.ndarray
    """Class ids into ``TaskData.label_names`` (int64), or float32 targets for regression."""
    text_pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> Split:
        """The rows ``idx``, in that order."""
        return Split(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            text_pairs=[self.text_pairs[i] for i in idx] if self.text_pairs is not None else None,
        )


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

    def subsample(
        self, train_n: int | None = None, dev_n: int | None = None, holdout: float = 0.0, seed: int = 0
    ) -> TaskData:
        """Train and dev splits, each optionally a random subset of ``train_n`` / ``dev_n`` rows
        fixed by ``seed`` (kept in file order), with a ``holdout`` fraction of the train subset
        moved to a ``heldout`` split."""
        from probekit.errors import ProbekitError

        for name in ("train", "dev"):
            if name not in self.splits:
                raise ProbekitError(f"task {self.name!r} has no {name} split; this needs train and dev")
        if not 0.0 <= holdout < 1.0:
            raise ProbekitError(f"the held-out fraction must be in [0, 1), got {holdout}")
        train, dev = self.splits["train"], self.splits["dev"]
        perm = np.random.default_rng(seed).permutation(len(train))[:train_n]
        n_hold = round(len(perm) * holdout)
        held, fit = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
        if len(fit) < 2:
            raise ProbekitError(
                f"{self.name}: only {len(fit)} training examples left; sample more of them (or hold out fewer)"
            )
        dev_idx = np.arange(len(dev))
        if dev_n is not None and dev_n < len(dev):
            dev_idx = np.sort(np.random.default_rng(seed + 1).permutation(len(dev))[:dev_n])
        splits = {"train": train.take(fit), "dev": dev.take(dev_idx)}
        if n_hold:
            splits[HELDOUT] = train.take(held)
        return TaskData(task=self.task, path=self.path, sha256=self.sha256, splits=splits, label_names=self.label_names)

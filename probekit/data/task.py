"""Tasks: what a dataset is (``Task``), what reading it gives (``TaskData`` of ``Split``\\ s), and the
task table, every dataset probekit can read under stable names.

Built-in tasks are declared in TOML files (``data/tasks/*.toml`` in the repository, shipped
inside the wheel as ``probekit/_tasks``), one table per task, so adding a task touches one
place. A user's own file in a known format is a task too: pass its path wherever a task name
is expected. Readers (one per file format) live in :mod:`probekit.data.readers`.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from probekit.errors import DataError, ParamError, ProbekitError
from probekit.registry import Registry

SPLITS = ("train", "dev", "test")
HELDOUT = "heldout"
"""A part of train set aside by :meth:`TaskData.subsample` (e.g. to fit exit policies)."""

UnseenLabels = Literal["error", "drop"]
"""What a reader does with dev/test rows whose label never occurs in train."""
UNSEEN_LABELS: tuple[str, ...] = typing.get_args(UnseenLabels)


@dataclass(frozen=True)
class Task:
    """What a dataset is and where its files live (not its contents: see ``TaskData``)."""

    name: str
    format: str
    relpath: str
    """Location inside a data directory (a file, or a folder for multi-file formats)."""
    collection: str = "custom"
    aliases: tuple[str, ...] = ()
    description: str = ""
    url: str | None = None
    sha256: str | None = None
    path: Path | None = None
    """An explicit location (a user's own file); overrides the data-dir lookup."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Format-specific settings (e.g. column layout of a GLUE task)."""


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


# ---------------------------------------------------------------- the task table


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


Fetcher = Callable[..., list[Path]]
"""A fetcher takes ``(dest, tasks, base_url, checksums, force, progress)`` and returns the paths it filled."""
FETCHERS: Registry[Fetcher] = Registry("collection", "collection")
"""Downloaders of a collection's tasks, by collection name (used by :func:`probekit.data.fetch.fetch`; the
built-in ones are registered in :mod:`probekit.data.readers`)."""

TASKS: Registry[Task] = Registry("task", "task", normalize=_key)
"""Every known task by name and alias (case-insensitive, ``-`` and ``_`` alike); filled from the TOML
files on first use (:func:`register_task` adds one)."""
_LOADED = False


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add a task to the table (names and aliases are case-insensitive)."""
    _ensure_loaded()
    return _add(task, overwrite)


def _add(task: Task, overwrite: bool) -> Task:
    if not overwrite:
        for k in (task.name, *task.aliases):
            if k in TASKS and TASKS.canonical(k) != task.name:
                raise ProbekitError(f"task name {_key(k)!r} is already used by task {TASKS.canonical(k)!r}")
    replace = overwrite or task.name in TASKS.names()
    TASKS.register(task.name, task, aliases=task.aliases, help=task.description, replace=replace)
    return task


def get_task(name_or_path: str | Path) -> Task:
    """Look a task up by name or alias, or make one from the path of a user's own file.

    A path is read in the SentEval format (``split<TAB>label<TAB>sentence``).
    """
    _ensure_loaded()
    text = str(name_or_path)
    if text in TASKS:
        return TASKS.get(text)
    path = Path(text).expanduser()
    if path.is_file():
        return Task(name=path.stem, format="senteval", relpath=path.name, path=path.resolve())
    known = ", ".join(sorted(TASKS.names()))
    hint = " (no such file either)" if ("/" in text or text.endswith((".txt", ".tsv"))) else ""
    close = difflib.get_close_matches(_key(text), [_key(n) for t in TASKS.names() for n in (t, *TASKS.get(t).aliases)])
    guess = f" Did you mean {TASKS.canonical(close[0])!r}?" if close and not hint else ""
    raise ProbekitError(
        f"unknown task {text!r}{hint}.{guess} Known tasks: {known}. "
        "A file of your own in SentEval format can be given by its path."
    )


def short_name(name: str) -> str:
    """A registered task's paper name (its first alias, e.g. ``BShift``), else ``name`` itself."""
    _ensure_loaded()
    if name not in TASKS:
        return name
    task = TASKS.get(name)
    return task.aliases[0] if task.aliases else name


def list_tasks(collection: str | None = None) -> list[Task]:
    """Registered tasks, optionally only those of one collection (e.g. ``senteval``)."""
    _ensure_loaded()
    return [t for _, t in TASKS.items() if collection is None or t.collection == collection]


def collections() -> list[str]:
    _ensure_loaded()
    return sorted({t.collection for _, t in TASKS.items()})


def registry_dir() -> Path:
    """Folder of the built-in task TOML files (wheel copy first, then the repository's)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_tasks", here.parent / "data" / "tasks"):
        if candidate.is_dir():
            return candidate
    raise ProbekitError(f"probekit's task registry is missing (looked in {here / '_tasks'}); reinstall probekit")


def load_collection_file(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for path in sorted(registry_dir().glob("*.toml")):
        spec = load_collection_file(path)
        for name, entry in spec.get("tasks", {}).items():
            _add(_task_from_spec(name, entry, spec), overwrite=False)


def _task_from_spec(name: str, entry: Mapping[str, Any], spec: Mapping[str, Any]) -> Task:
    fname = entry.get("file", name)
    subdir = spec.get("subdir", "")
    base_url = spec.get("base_url")
    reserved = {"aliases", "file", "description", "sha256", "url", "format"}
    return Task(
        name=name,
        format=entry.get("format", spec.get("format", "senteval")),
        relpath=f"{subdir}/{fname}" if subdir else fname,
        collection=spec.get("collection", "custom"),
        aliases=tuple(entry.get("aliases", ())),
        description=entry.get("description", ""),
        url=entry.get("url") or (base_url + fname if base_url else None),
        sha256=entry.get("sha256") or None,
        options={k: v for k, v in entry.items() if k not in reserved},
    )


def check_unseen_labels(value: str) -> str:
    """``value`` if it is one of :data:`UNSEEN_LABELS`, else a :class:`ParamError`."""
    if value not in UNSEEN_LABELS:
        raise ParamError("unseen_labels", f"must be one of {', '.join(UNSEEN_LABELS)}, got {value!r}")
    return value


def unseen_label_error(path: str | Path, split: str, label: str, line: int | None) -> DataError:
    """The error for a dev/test label that never occurs in train; it names the ``unseen_labels`` parameter
    (rendered ``--unseen-labels`` by the CLI)."""
    return DataError(
        path,
        f"label {label!r} of the {split} split never occurs in the train split "
        "(pass {unseen_labels} drop to drop such rows)",
        line=line,
        params=("unseen_labels",),
    )

"""Datasets: the task registry, file readers, data-dir lookup and downloads."""

from __future__ import annotations

from pathlib import Path

from probekit.data import glue as _glue  # noqa: F401  (registers its reader and fetcher)
from probekit.data import senteval as _senteval  # noqa: F401  (registers its reader)
from probekit.data.fetch import fetch
from probekit.data.locate import default_data_dir, locate, search_dirs
from probekit.data.registry import Task, get_task, list_tasks, reader_for, register_task
from probekit.data.types import HELDOUT, SPLITS, Split, TaskData


def load_task(task: str | Path | Task, data_dir: str | Path | None = None, **options: object) -> TaskData:
    """Find and read a task's data (by name, alias, path, or ``Task``).

    ``options`` go to the format's reader (e.g. ``unseen_labels="drop"`` for SentEval).
    """
    t = task if isinstance(task, Task) else get_task(task)
    return reader_for(t.format)(t, locate(t, data_dir), **options)


__all__ = [
    "HELDOUT",
    "SPLITS",
    "Split",
    "Task",
    "TaskData",
    "default_data_dir",
    "fetch",
    "get_task",
    "list_tasks",
    "load_task",
    "locate",
    "register_task",
    "search_dirs",
]

"""Datasets: the task table, file readers, data-dir lookup and downloads."""

from __future__ import annotations

from probekit.data.fetch import FETCHERS, fetch
from probekit.data.locate import default_data_dir, locate, search_dirs
from probekit.data.readers import READERS, load_task, reader_for
from probekit.data.task import (
    HELDOUT,
    SPLITS,
    TASKS,
    UNSEEN_LABELS,
    Split,
    Task,
    TaskData,
    get_task,
    list_tasks,
    register_task,
    short_name,
)

__all__ = [
    "FETCHERS",
    "HELDOUT",
    "READERS",
    "SPLITS",
    "TASKS",
    "UNSEEN_LABELS",
    "Split",
    "Task",
    "TaskData",
    "default_data_dir",
    "fetch",
    "get_task",
    "list_tasks",
    "load_task",
    "locate",
    "reader_for",
    "register_task",
    "search_dirs",
    "short_name",
]

"""The data formats probekit reads and the collections it downloads, registered by name in one place.

``READERS`` maps a task's ``format`` (``senteval``, ``glue``) to the function that reads its files;
``FETCHERS`` (:mod:`probekit.data.fetch`) maps a collection to its downloader. A plugin adds a
format with ``READERS.register("myformat", read_myformat)`` and then declares tasks of that format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from probekit.data.fetch import FETCHERS, fetch_senteval
from probekit.data.glue import fetch_glue, read_glue
from probekit.data.locate import locate
from probekit.data.senteval import read_senteval
from probekit.data.task import Task, TaskData, get_task
from probekit.registry import Registry

Reader = Callable[..., TaskData]
"""A reader takes ``(task, path, **options)`` (e.g. ``unseen_labels``) and returns the task's ``TaskData``."""

READERS: Registry[Reader] = Registry("data format", "format")

READERS.register("senteval", read_senteval, help="SentEval probing files: split<TAB>label<TAB>sentence.")
READERS.register("glue", read_glue, help="A GLUE task folder of TSV files (train.tsv, dev.tsv).")
FETCHERS.register("senteval", fetch_senteval, help="The ten SentEval probing tasks.")
FETCHERS.register("glue", fetch_glue, help="The GLUE benchmark's tasks.")


def reader_for(fmt: str) -> Reader:
    """The reader of data format ``fmt`` (a :class:`ParamError` naming ``format`` for an unknown one)."""
    return READERS.get(fmt)


def load_task(task: str | Path | Task, data_dir: str | Path | None = None, **options: object) -> TaskData:
    """Find and read a task's data (by name, alias, path, or ``Task``).

    ``options`` go to the format's reader (e.g. ``unseen_labels="drop"`` for SentEval).
    """
    t = task if isinstance(task, Task) else get_task(task)
    return reader_for(t.format)(t, locate(t, data_dir), **options)

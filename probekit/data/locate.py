"""Where data lives: ``--data-dir``, then ``$PROBEKIT_DATA_DIR``, then the user cache dir.

Each of them has the same layout (``senteval/probing/<file>.txt``,
``glue/<TASK>/{train,dev}.tsv``), so any directory laid out like the shared data
serves every command.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from probekit.data.task import FETCHERS, Task
from probekit.errors import ProbekitError

ENV_VAR = "PROBEKIT_DATA_DIR"


def default_data_dir() -> Path:
    """The user cache directory that ``probekit data fetch`` downloads into by default."""
    return Path(platformdirs.user_cache_dir("probekit")) / "data"


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Data directories in the order they are searched."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(default_data_dir())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def locate(task: Task, data_dir: str | Path | None = None) -> Path:
    """The file (or folder) holding ``task``, or an error that says how to get it."""
    if task.path is not None:
        if not task.path.exists():
            raise ProbekitError(f"task {task.name!r}: {task.path} does not exist")
        return task.path
    dirs = search_dirs(data_dir)
    for d in dirs:
        candidate = d / task.relpath
        if candidate.exists():
            return candidate
    looked = ", ".join(str(d) for d in dirs)
    fetch = (
        f"`probekit data fetch {task.collection}` (downloads into {default_data_dir()}, or --dest DIR)"
        if task.url or task.collection in FETCHERS
        else "copying the file there"
    )
    raise ProbekitError(
        f"task {task.name!r}: {task.relpath} not found in {looked}. Get it with {fetch}, "
        "or point {data_dir} " + f"or ${ENV_VAR} at a directory that has {task.relpath}.",
        params=("data_dir",),
    )

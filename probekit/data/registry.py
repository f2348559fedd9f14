"""The task registry: every dataset probekit can read, under stable names.

Built-in tasks are declared in TOML files (``data/tasks/*.toml`` in the repository,
shipped inside the wheel as ``probekit/_tasks``), one table per task, so adding a
task touches one place. A user's own file in a known format is a task too: pass
its path wherever a task name is expected.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit.errors import ProbekitError

if TYPE_CHECKING:
    from probekit.data.types import TaskData


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


Reader = Callable[..., "TaskData"]
"""A reader takes ``(task, path, **options)`` and returns the task's ``TaskData``."""

_TASKS: dict[str, Task] = {}
_LOOKUP: dict[str, str] = {}
_READERS: dict[str, Reader] = {}
_LOADED = False


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def register_reader(fmt: str) -> Callable[[Reader], Reader]:
    """Decorator: register the function that reads files of format ``fmt``."""

    def deco(fn: Reader) -> Reader:
        _READERS[fmt] = fn
        return fn

    return deco


def reader_for(fmt: str) -> Reader:
    import probekit.data  # noqa: F401  (imports every reader module, which registers itself)

    try:
        return _READERS[fmt]
    except KeyError:
        raise ProbekitError(f"no reader for data format {fmt!r}; known: {sorted(_READERS)}") from None


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add a task to the registry (names and aliases are case-insensitive)."""
    _ensure_loaded()
    keys = [_key(task.name), *(_key(a) for a in task.aliases)]
    if not overwrite:
        for k in keys:
            if k in _LOOKUP and _LOOKUP[k] != task.name:
                raise ProbekitError(f"task name {k!r} is already used by task {_LOOKUP[k]!r}")
    _TASKS[task.name] = task
    for k in keys:
        _LOOKUP[k] = task.name
    return task


def get_task(name_or_path: str | Path) -> Task:
    """Look a task up by name or alias, or make one from the path of a user's own file.

    A path is read in the SentEval format (``split<TAB>label<TAB>sentence``).
    """
    _ensure_loaded()
    text = str(name_or_path)
    if _key(text) in _LOOKUP:
        return _TASKS[_LOOKUP[_key(text)]]
    path = Path(text).expanduser()
    if path.is_file():
        return Task(name=path.stem, format="senteval", relpath=path.name, path=path.resolve())
    known = ", ".join(sorted(_TASKS))
    hint = " (no such file either)" if ("/" in text or text.endswith((".txt", ".tsv"))) else ""
    raise ProbekitError(
        f"unknown task {text!r}{hint}. Known tasks: {known}. "
        "A file of your own in SentEval format can be given by its path."
    )


def short_name(name: str) -> str:
    """A registered task's paper name (its first alias, e.g. ``BShift``), else ``name`` itself."""
    _ensure_loaded()
    task = _TASKS.get(_LOOKUP.get(_key(name), ""))
    return task.aliases[0] if task is not None and task.aliases else name


def list_tasks(collection: str | None = None) -> list[Task]:
    """Registered tasks, optionally only those of one collection (e.g. ``senteval``)."""
    _ensure_loaded()
    return [t for t in _TASKS.values() if collection is None or t.collection == collection]


def collections() -> list[str]:
    _ensure_loaded()
    return sorted({t.collection for t in _TASKS.values()})


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
            register_task(_task_from_spec(name, entry, spec))


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

"""Path arguments and untrusted names, checked in one place.

Every command checks its inputs (missing, a file where a folder is expected or the reverse, unreadable) and
its output location (an existing file, a folder under a file, unwritable, a folder holding things probekit
did not write) here, before anything is read or written, so each mistake is one line naming the parameter.
Names that end up in file names (``--name``, task and model names) go through :func:`slug` first, so a name
with HTML, quotes or path separators can never reach outside the output folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from probekit.errors import ParamError

Kind = Literal["file", "dir", "any"]

_UNSAFE = re.compile(r"(?:[^A-Za-z0-9._-]|\.{2,})+")  # a run of unsafe characters or of dots becomes one _
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("probekit_strict_outputs", default=False)


def slug(name: str) -> str:
    """A file-name-safe form of an untrusted name: only ``[A-Za-z0-9._-]``, never ``.``/``..`` or a leading dot.

    A name that is already safe is returned unchanged (so existing caches keep their folders)."""
    text = _UNSAFE.sub("_", str(name)).lstrip(".")
    return text or "_"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def check_input(path: str | Path, param: str, kind: Kind = "any") -> Path:
    """``path`` as an existing, readable file (``kind="file"``), folder (``"dir"``) or either; else a one-line
    :class:`~probekit.errors.ParamError` naming ``param``."""
    path = Path(path)
    if not path.exists():
        raise ParamError(param, f"{path} does not exist")
    if kind == "file" and path.is_dir():
        raise ParamError(param, f"{path} is a folder; give a file")
    if kind == "dir" and not path.is_dir():
        raise ParamError(param, f"{path} is a file; give a folder")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not _is_root() and not os.access(path, mode):
        raise ParamError(param, f"{path} is not readable (check its permissions)")
    return path


def check_output(path: str | Path, param: str) -> Path:
    """``path`` as a folder probekit can create or write: not an existing file, not under a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ParamError(param, f"{path} is an existing file; give a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ParamError(param, f"{path} cannot be created: {existing} is a file")
    if existing.is_dir() and not _is_root() and not os.access(existing, os.W_OK | os.X_OK):
        raise ParamError(param, f"{existing} is not writable; choose another folder")
    return path


MARKERS = (
    "fingerprint.json",
    "manifest.json",
    "progress.json",
    "results.parquet",
    "metrics.json",
    "state.json",
    "report.json",
)
"""Files that only probekit writes: a folder holding one (at most three levels down) is probekit's."""
OWN_SUFFIXES = (".partial", ".shards", ".tmp", ".lock")
OWN_FILES = ("results.csv", "sweep.csv", "comparison.csv", "comparison.md", "summary.md", "index.html", "mlm_run.json")


def probekit_wrote(entry: Path, depth: int = 3) -> bool:
    """Whether an entry of an output folder is probekit's: hidden (temporary files, parts, stamps), a file or
    folder named as probekit names them (locks, partial caches), a folder holding one of :data:`MARKERS` (at
    most ``depth`` levels down), or a folder all of whose entries are probekit's (an interrupted run's)."""
    name = entry.name
    if name.startswith(".") or name.endswith(OWN_SUFFIXES) or name in MARKERS or name in OWN_FILES:
        return True
    if not entry.is_dir() or entry.is_symlink():
        return False
    if any((d / m).is_file() for d in (entry, *_subdirs(entry, depth)) for m in MARKERS):
        return True
    return depth > 0 and all(probekit_wrote(child, depth - 1) for child in entry.iterdir())


def _subdirs(root: Path, depth: int) -> list[Path]:
    level, found = [root], []
    for _ in range(depth):
        level = [d for p in level for d in p.iterdir() if d.is_dir() and not d.is_symlink()]
        found += level
    return found


def foreign_entries(path: Path, owned: Callable[[Path], bool] = probekit_wrote) -> list[Path]:
    """The entries of the folder ``path`` that ``owned`` does not recognise as probekit's (none when the folder
    itself holds one of :data:`MARKERS`: probekit wrote it, and its other files)."""
    if not path.is_dir() or any((path / m).is_file() for m in MARKERS):
        return []
    return sorted(p for p in path.iterdir() if not owned(p))


@contextlib.contextmanager
def strict_outputs() -> Iterator[None]:
    """Within this block (the CLI), an output folder holding things probekit did not write is refused; the
    Python API leaves the caller's folders to the caller."""
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def claim_output(
    path: str | Path, param: str, force: bool, force_param: str, owned: Callable[[Path], bool] = probekit_wrote
) -> None:
    """Refuse (under :func:`strict_outputs`) to write into ``path`` when it holds entries probekit did not
    write, unless ``force``; called by a runner once its options are valid, before its first write."""
    path = Path(path)
    if not _STRICT.get() or force:
        return
    foreign = foreign_entries(path, owned)
    if foreign:
        names = ", ".join(p.name for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ParamError(
            param,
            f"{path} holds files probekit did not write ({names}); choose a new folder or pass {{{force_param}}}",
            params=(force_param,),
        )

"""Atomic writes and content hashing.

Every artifact probekit writes (caches, manifests, results, downloads) goes through
these helpers: data lands in a temporary file in the destination directory and is
renamed into place only once complete, so an interrupted run never leaves a
half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from probekit.errors import ProbekitError

CHUNK = 1 << 20
LOCK = ".{name}.lock"
"""The lock file :func:`exclusive` keeps next to an output folder ``name`` while a process writes it (it holds
the pid; next to, not in: a command may replace the whole folder)."""
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file is removed if the block raises, so ``path`` is either the old
    complete file or the new complete file, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when closed cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a canonical JSON encoding: a stable key for a settings dict."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished folder ``src`` onto ``dst``: the old ``dst`` is renamed aside first and
    removed after, so ``dst`` is always a complete folder, old or new."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
    remove_tree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    remove_tree(old)
    return dst


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree; silently ignore a path that does not exist."""
    shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def lock_file(lock: str | Path, what: str | Path, param: str = "out") -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` for the block, or refuse in one line naming the
    holder's pid: two processes never write ``what`` at once. The lock dies with its process (even
    SIGKILLed), so a killed run never blocks the next one; the file is removed on a clean exit."""
    lock = Path(lock)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ProbekitError(
                f"{what} is being written by another probekit process (pid {pid}); "
                "wait for it or choose another {" + param + "}",
                params=(param,),
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiter re-checks the inode (above)
        os.close(fd)


@contextlib.contextmanager
def exclusive(folder: str | Path, param: str = "out") -> Iterator[None]:
    """Lock the output folder ``folder`` (:data:`LOCK` next to it) for the block; another probekit process
    writing it meanwhile is refused in one line. Folders made only to hold the lock are removed again
    when the block writes nothing in them, so a refused or failed command leaves nothing behind.

    A path that exists but is not a folder is not locked: the command's own check reports it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        yield
        return
    folder = folder.absolute()
    made = [p for p in folder.parents if not p.exists()]  # deepest first
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_empty, made)  # runs last, after the lock file is gone
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(lock_file(folder.parent / LOCK.format(name=folder.name), folder, param))
        except OSError as e:
            raise ProbekitError(
                f"cannot write {{{param}}} {folder}: {e.strerror or type(e).__name__}; choose a writable folder",
                params=(param,),
            ) from None
        yield


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders in ``made`` (deepest first) while they are empty."""
    for p in made:
        try:
            p.rmdir()
        except OSError:
            break  # holds something: the command wrote it

"""User-facing errors.

Anything the user can fix (a bad file, a missing task, a wrong option) raises a
:class:`ProbekitError`; the CLI prints its message on one line and exits with code 2,
so a traceback always means a bug in probekit, never a mistake of the user.
"""

from __future__ import annotations

from pathlib import Path


class ProbekitError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""

    exit_code = 2


class DataError(ProbekitError):
    """A data file is malformed; the message names the file and, where known, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


class CacheError(ProbekitError):
    """A feature cache is missing, incomplete, corrupt or from an incompatible version."""

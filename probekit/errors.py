"""User-facing errors and warnings.

Anything the user can fix (a bad file, a missing task, a wrong option) raises a
:class:`ProbekitError`; the CLI prints its message on one line and exits with code 2,
so a traceback always means a bug in probekit, never a mistake of the user.

The library speaks parameter names, not flags: an error about an option is a
:class:`ParamError` naming the parameter (``max_iter: must be >= 1, got 0``), and a message
may mention other parameters as ``{name}`` markers (listed in ``params``). Each front end
renders them its own way (:meth:`ProbekitError.render`): the CLI as ``--max-iter``, a suite
file as ``[probe] max_iter``, the Python API as the parameter name itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path


class ProbekitError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, *, params: Iterable[str] = ()) -> None:
        self.template = message
        self.params = tuple(params)
        super().__init__(self.render({}))

    def render(self, names: Mapping[str, str]) -> str:
        """The message with every ``{param}`` marker replaced by ``names[param]`` (default: the name)."""
        text = self.template
        for p in self.params:
            text = text.replace("{" + p + "}", names.get(p, p))
        return text


class ParamError(ProbekitError):
    """A bad value for the parameter ``param``: rendered ``param: detail`` (``--param: detail`` by the CLI)."""

    def __init__(self, param: str, detail: str, *, params: Iterable[str] = ()) -> None:
        self.param = param
        self.detail = detail
        super().__init__("{" + param + "}: " + detail, params=(param, *params))


class DataError(ProbekitError):
    """A data file is malformed; the message names the file and, where known, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, *, params: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}", params=params)


class CacheError(ProbekitError):
    """A feature cache is missing, incomplete, corrupt or from an incompatible version."""


class ResumeError(ProbekitError):
    """An output folder holds an artifact made from other settings or inputs (see :mod:`probekit.fingerprint`)."""


class ProbekitWarning(UserWarning):
    """Something the user should know about a run that still finished (left-out layers, a skipped step)."""


class ConvergenceWarning(ProbekitWarning):
    """An iterative fit stopped at its iteration or epoch limit before converging."""

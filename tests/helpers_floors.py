"""Test helpers of the data / extraction floors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from probekit.errors import ProbekitError


def cli_flag(param: str) -> str:
    return "--" + param.replace("_", "-")


@contextmanager
def as_cli() -> Iterator[None]:
    """Re-raise a library error as the CLI shows it: parameter names rendered as flags (``batch_size`` ->
    ``--batch-size``), as :mod:`probekit.cli`'s error boundary does."""
    try:
        yield
    except ProbekitError as e:
        raise ProbekitError(e.render({p: cli_flag(p) for p in e.params})) from e

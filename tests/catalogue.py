"""The catalogue of bad inputs: one row per way a user can get an input wrong. Each row runs through the CLI and
must end with exit code 2, one line on stderr starting with ``error:`` and naming the problem, no traceback, and
nothing written (tests/test_catalogue_*.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Case:
    id: str
    args: list[str]
    """probekit's arguments; ``{tmp}`` is the test's folder, ``{model}`` a tiny BERT folder."""
    stderr: str
    """A substring of the one error line."""
    setup: Callable[[Path], None] | None = None
    """Makes the files the case needs under the test's folder."""

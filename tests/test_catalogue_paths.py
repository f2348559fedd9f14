"""Every row of ``tests/catalogue_paths.py`` through the CLI: exit code 2, one ``error:`` line naming the
problem, no traceback, and no file written or changed anywhere under the test's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit.cli import app
from tests.catalogue import Case
from tests.catalogue_paths import CASES


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue_row(case: Case, tiny_model: Path, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    before = _snapshot(tmp_path)
    args = [a.format(tmp=tmp_path, model=tiny_model) for a in case.args]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert case.stderr.format(tmp=tmp_path, model=tiny_model) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _snapshot(tmp_path) == before, "the command wrote or changed files"

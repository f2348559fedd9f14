"""Every row of tests/catalogue_interrupts.py through the CLI: exit code 2, one ``error:`` line naming the
problem, no traceback, nothing written where the command writes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit.cli import app
from tests.catalogue import Case
from tests.catalogue_interrupts import CASES, HELD

OUTPUTS = ("out", "results")
"""The output locations the rows name (under {tmp})."""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, tiny_model: Path, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_model)) for a in case.args]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        while HELD:
            fd = HELD.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert result.exit_code == 2, (result.exit_code, result.output, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.stderr in lines[0], lines[0]
    assert "Traceback" not in result.output + err
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for name in OUTPUTS:
        assert not (tmp_path / name).exists(), f"{case.id} wrote {tmp_path / name}"

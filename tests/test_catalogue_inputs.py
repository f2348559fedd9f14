"""The bad inputs of share ``inputs`` (tests/catalogue_inputs.py) through the CLI: each ends with exit code 2 and
one ``error:`` line naming the problem, no traceback, and nothing written where the output would go."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit.cli import app
from tests.catalogue import Case
from tests.catalogue_inputs import CASES


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, tiny_model: Path, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path, model=tiny_model) for a in case.args]
    result = CliRunner().invoke(app, args)
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert not [line for line in output.splitlines() if not line.startswith(("error: ", "warning: "))], output
    assert case.stderr in errors[0], errors[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere

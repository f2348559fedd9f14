"""The `probekit` command: help everywhere, version, extract and cache commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit import LayerCache, __version__
from probekit.cli import app
from tests.helpers import run_probekit

runner = CliRunner()


def commands(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import typer.main

    cmd = typer.main.get_command(group) if not hasattr(group, "commands") else group
    out = [prefix]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += commands(sub, (*prefix, name)) if hasattr(sub, "commands") else [(*prefix, name)]
    return out


def test_help_on_every_command_and_version() -> None:
    found = commands(app)
    assert ("extract",) in found and ("cache", "ls") in found and ("data", "fetch") in found
    for path in found:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"probekit {__version__}"


def test_console_script_runs() -> None:
    proc = run_probekit("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("probekit ")


def test_extract_ls_verify_rm(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    out = tmp_path / "caches"
    result = runner.invoke(
        app,
        ["extract", "--model", str(tiny_model), "--task", str(toy_task), "--pool", "cls", "--out", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    [path] = list(out.glob("*/toy-cls-128-*"))
    cache = LayerCache.open(path)
    assert cache.pool == "cls" and cache["train"].shape == (40, 3, 32)
    result = runner.invoke(app, ["cache", "ls", str(out)])
    assert result.exit_code == 0 and "toy" in result.output and "cls" in result.output
    result = runner.invoke(app, ["cache", "verify", str(out)])
    assert result.exit_code == 0 and result.output.startswith("ok")
    result = runner.invoke(app, ["cache", "rm", str(out), "--yes"])
    assert result.exit_code == 0 and not path.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cache", "ls", "/no/such/dir"], "error: cache directory /no/such/dir does not exist"),
        (
            ["extract", "--model", "/no/such/model", "--task", "BShift", "--out", "x", "--data-dir", "/nowhere"],
            "error: task 'bigram_shift': senteval/probing/bigram_shift.txt not found",
        ),
        (
            ["extract", "--model", "no-such-org/model", "--task", "{toy}", "--out", "{tmp}"],
            "error: model 'no-such-org/model' is not a local folder",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(args: list[str], message: str, toy_task: Path, tmp_path: Path) -> None:
    args = [a.format(toy=toy_task, tmp=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output


def test_cache_rm_refuses_non_caches(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    result = runner.invoke(app, ["cache", "rm", str(tmp_path / "precious"), "--yes"])
    assert result.exit_code == 2 and (tmp_path / "precious" / "thesis.tex").exists()


def test_the_cli_starts_without_seaborn_and_figures_still_find_its_colormaps() -> None:
    import subprocess
    import sys

    code = (
        "import sys, probekit.cli\n"
        "assert not {'seaborn', 'scipy.stats', 'transformers.masking_utils'} & set(sys.modules), 'heavy import'\n"
        "import matplotlib as mpl\n"
        "from probekit.plot.style import SEQUENTIAL, _styled\n"
        "print(_styled(lambda: mpl.colormaps[SEQUENTIAL].name)())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "mako_r"

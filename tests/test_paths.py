"""Path arguments, output locations and untrusted names (probekit.paths): spaces and non-ASCII work, names never
reach outside the output folder nor into the report's HTML unescaped, foreign folders are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import probekit
from probekit.cli import app
from probekit.errors import ParamError
from probekit.paths import check_input, check_output, claim_output, foreign_entries, slug, strict_outputs
from probekit.results import load_results, save_results
from probekit.suite.file import ModelConfig
from tests.helpers import toy_senteval

runner = CliRunner()
SCRIPT = "<script>alert(1)</script>"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert-base", "bert-base"),
        ("model_v1.2", "model_v1.2"),
        ("../../escaped", "_escaped"),
        (SCRIPT, "_script_alert_1_script_"),
        ("a/b\\c", "a_b_c"),
        ('"quoted" name', "_quoted_name"),
        ("..", "_"),
        ("", "_"),
    ],
)
def test_slug_keeps_safe_names_and_defuses_the_rest(name: str, expected: str) -> None:
    got = slug(name)
    assert got == expected
    assert ".." not in got and "/" not in got and not got.startswith(".")
    assert slug(got) == got


def test_input_and_output_checks(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert check_input(tmp_path / "f", "task", "file") == tmp_path / "f"
    for path, kind, says in [
        (tmp_path / "none", "any", "does not exist"),
        (tmp_path / "d", "file", "is a folder; give a file"),
        (tmp_path / "f", "dir", "is a file; give a folder"),
    ]:
        with pytest.raises(ParamError, match=says) as info:
            check_input(path, "p", kind)  # type: ignore[arg-type]
        assert info.value.param == "p"
    assert check_output(tmp_path / "new" / "deep", "out") == tmp_path / "new" / "deep"
    with pytest.raises(ParamError, match="is an existing file"):
        check_output(tmp_path / "f", "out")
    with pytest.raises(ParamError, match=r"cannot be created: .*/f is a file"):
        check_output(tmp_path / "f" / "a" / "b", "out")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ParamError, match="is not writable"):
            check_output(locked / "out", "out")
    finally:
        locked.chmod(0o700)


def test_foreign_folders_are_refused_only_from_the_cli(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "a.txt").write_text("x")
    (mine / "empty").mkdir()
    (mine / ".results.parquet.123.tmp").write_text("")
    (mine / "m" / "c").mkdir(parents=True)
    (mine / "m" / "c" / "manifest.json").write_text("{}")
    assert [p.name for p in foreign_entries(mine)] == ["notes"]
    claim_output(mine, "out", force=False, force_param="fresh")  # the Python API: the caller's folder
    with strict_outputs():
        with pytest.raises(ParamError, match=r"holds files probekit did not write \(notes\).* pass fresh$") as info:
            claim_output(mine, "out", force=False, force_param="fresh")
        assert info.value.param == "out" and "fresh" in info.value.params
        claim_output(mine, "out", force=True, force_param="fresh")
        claim_output(tmp_path / "absent", "out", force=False, force_param="fresh")


def test_spaces_and_non_ascii_paths_work(tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "my data dir" / "Données ünï 数据"
    task = toy_senteval(root / "tâche à faire.txt", n=(12, 4, 4))
    caches, results = root / "caches out", root / "résultats"
    result = runner.invoke(app, ["extract", "-m", str(tiny_model), "-t", str(task), "-o", str(caches), "-q"])
    assert result.exit_code == 0, result.output
    [manifest] = caches.rglob("manifest.json")
    assert manifest.parent.name.startswith("t_che_") and manifest.parent.is_relative_to(caches)
    result = runner.invoke(app, ["probe", str(caches), "-o", str(results), "-q", "--no-control"])
    assert result.exit_code == 0, result.output
    assert load_results(results)["task"].unique().tolist() == ["tâche à faire"]


def test_untrusted_names_stay_inside_the_output_folder_and_probe_finds_them(tiny_model: Path, tmp_path: Path) -> None:
    task = toy_senteval(tmp_path / "toy.txt", n=(12, 4, 4))
    out = tmp_path / "out" / "nm" / "a"
    before = _files(tmp_path)
    for name in ["../../escaped", SCRIPT]:
        args = ["extract", "-m", str(tiny_model), "-t", str(task), "-o", str(out), "--name", name, "-q"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    new = _files(tmp_path) - before
    assert new and all(p.is_relative_to(out) or p in {out, out.parent, out.parent.parent} for p in new)
    assert {p.name for p in out.iterdir()} == {"_escaped", "_script_alert_1_script_"}
    assert not any("<" in p.name or ">" in p.name for p in new)
    for model in ["_escaped", "_script_alert_1_script_"]:
        res = tmp_path / f"res-{model}"
        result = runner.invoke(app, ["probe", str(out / model), "-o", str(res), "-q", "--no-control"])
        assert result.exit_code == 0, result.output
    assert load_results(tmp_path / "res-_script_alert_1_script_")["model"].unique().tolist() == [SCRIPT]


def test_report_escapes_names(tiny_model: Path, tmp_path: Path) -> None:
    task = toy_senteval(tmp_path / "toy.txt", n=(12, 4, 4))
    [cache] = probekit.extract(tiny_model, [task], tmp_path / "c", name=SCRIPT, progress=False)
    rows = probekit.probe([cache], device="cpu", control=False, progress=False).results
    rows["task"] = '<img src=x onerror="alert(2)">'
    save_results(rows, tmp_path / "res")
    result = runner.invoke(app, ["report", str(tmp_path / "res"), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "&lt;img src=x" in page and "<img src=x" not in page
    assert all(p.is_relative_to(tmp_path / "rep") for p in (tmp_path / "rep").rglob("*"))
    assert not any("<" in p.name for p in (tmp_path / "rep").rglob("*"))


def test_cli_refuses_foreign_output_folders_until_fresh(tiny_model: Path, tmp_path: Path) -> None:
    task = toy_senteval(tmp_path / "toy.txt", n=(12, 4, 4))
    extract = ["extract", "-m", str(tiny_model), "-t", str(task), "-q"]
    assert runner.invoke(app, [*extract, "-o", str(tmp_path / "c")]).exit_code == 0
    assert runner.invoke(app, [*extract, "-o", str(tmp_path / "c")]).exit_code == 0  # its own folder: reused
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("x")
    for cmd in (extract, ["probe", str(tmp_path / "c"), "-q"]):
        before = _files(tmp_path)
        result = runner.invoke(app, [*cmd, "-o", str(home)])
        assert result.exit_code == 2 and result.output.startswith(f"error: --out: {home} holds files probekit")
        assert "--fresh" in result.output and len(result.output.strip().splitlines()) == 1
        assert _files(tmp_path) == before
    result = runner.invoke(app, ["probe", str(tmp_path / "c"), "-o", str(home), "-q", "--fresh", "--no-control"])
    assert result.exit_code == 0, result.output
    assert (home / "thesis.tex").read_text() == "x" and isinstance(load_results(home), pd.DataFrame)


def test_a_suite_model_name_must_be_a_safe_folder_name() -> None:
    assert ModelConfig(name="minilm-v2.1").name == "minilm-v2.1"
    for bad in ["../up", SCRIPT, "a b"]:
        with pytest.raises(ParamError, match="use only letters, digits") as info:
            ModelConfig(name=bad)
        assert info.value.param == "name"

"""The study runner: a small suite on tiny models end to end, then a second run that does no work."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import transformers
from typer.testing import CliRunner

import probekit.extraction
import probekit.probes
import probekit.report
from probekit import load_results
from probekit.cli import app
from probekit.errors import DataError
from probekit.suite import load_suite, run_suite
from tests.helpers import toy_senteval
from tests.test_finetune import write_cola

SUITE = """
name = "tiny_study"
out = "runs/study"
data_dir = "data"
threads = 1

[model]
name = "tiny"
path = "{model}"

[finetune]
tasks = ["cola"]
seeds = 1
grid = "quick"
max_steps = 4
max_train_samples = {{ cola = 64 }}

[compare]
variants = ["drop-layers"]
drop = 1

[probe]
tasks = ["toy_a.txt", "toy_b.txt"]
pool = "mean"
max_length = 32
seeds = 1

[report]
out = "reports/study"
top = 2
"""


def write_suite(root: Path, model: Path, text: str = SUITE) -> Path:
    write_cola(root / "data")
    toy_senteval(root / "toy_a.txt", seed=1)
    toy_senteval(root / "toy_b.txt", seed=2, labels=("A", "B", "C"))
    path = root / "study.toml"
    path.write_text(text.format(model=model), encoding="utf-8")
    return path


def assert_second_run_does_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished suite run again trains, extracts, probes and reports nothing (each of them would raise)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second run did work")

    for owner, name in [
        (transformers.Trainer, "train"),
        (probekit.extraction, "extract"),
        (probekit.probes, "probe"),
        (probekit.report, "build_report"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)
    again = run_suite(path, progress=False)
    assert set(statuses(again).values()) == {"skipped"} and again.ran == []


def statuses(run) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def]
    return {(s.step, s.target): s.status for s in run.steps}


def test_suite_runs_end_to_end_then_does_nothing(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    path = write_suite(tmp_path, tiny_model)
    run = run_suite(path, progress=False)
    assert statuses(run) == {
        ("finetune", "cola/plain"): "ran",
        ("compare", "cola/drop-layers-n1"): "ran",
        ("extract", "tiny"): "ran",
        ("extract", "tiny-cola-s0"): "ran",
        ("probe", "tiny"): "ran",
        ("probe", "tiny-cola-s0"): "ran",
        ("report", str(tmp_path / "reports" / "study")): "ran",
    }
    assert [s.step for s in run.steps][-3:] == ["report", "compare", "report"]  # the comparison comes last
    # outputs where the suite says, paths relative to the suite file
    study = tmp_path / "runs" / "study"
    assert (study / "finetune" / "cola" / "plain" / "seed0" / "best" / "model.safetensors").is_file()
    results = load_results(study / "results" / "tiny-cola-s0")
    assert set(results["model"]) == {"tiny-cola-s0"} and set(results["task"]) == {"toy_a", "toy_b"}
    assert sorted(results["layer"].unique()) == [0, 1, 2]
    report = tmp_path / "reports" / "study"
    assert (report / "index.html").is_file() and (report / "figures" / "deltas.png").is_file()
    deltas = pd.read_csv(report / "deltas.csv")
    assert set(deltas["model"]) == {"tiny-cola-s0"} and set(deltas["finetune_task"]) == {"cola"}
    assert set(deltas["baseline"]) == {"tiny"}
    table = (report / "finetune.md").read_text()
    assert "| plain |" in table and "| drop-layers-n1 |" in table
    timings = (study / "timings.json").read_text()
    assert "extract tiny-cola-s0" in timings and "report" in timings

    assert_second_run_does_nothing(path, monkeypatch)

    # an interrupted study resumes: a missing probe result is redone, and the report after it
    monkeypatch.undo()
    (study / ".suite" / "probe-tiny-cola-s0.json").unlink()
    third = run_suite(path, progress=False)
    assert [(s.step, s.target) for s in third.ran][:1] == [("probe", "tiny-cola-s0")]
    assert statuses(third)[("extract", "tiny-cola-s0")] == "skipped"
    assert statuses(third)[("finetune", "cola/plain")] == "skipped"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("seeds = 1", "seedz = 1"), "unknown key 'seedz' in [finetune]"),
        (("seeds = 1\ngrid", "seeds = 1\nvariants = ['drop-layers']\ngrid"), "put drop-layers under [compare]"),
        (("max_length = 32", "max_length = '32'"), "[probe]: max_length must be a int"),
        (('tasks = ["cola"]', 'tasks = ["bigram_shift"]'), "[finetune] task 'bigram_shift' is not a GLUE task"),
        (("[probe]", "[probes]"), "unknown key 'probes'"),
        (("drop = 1", "copy_from = 1"), "[compare] --variant drop-layers needs drop N"),
        (('grid = "quick"', 'grid = "fast"'), "grid 'fast' is not one of default, quick"),
        (("threads = 1", "threads = "), "not valid TOML"),
    ],
)
def test_suite_file_errors_name_the_file(tiny_model: Path, tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = write_suite(tmp_path, tiny_model, SUITE.replace(*edit))
    with pytest.raises(DataError, match=r"study\.toml") as err:
        load_suite(path)
    assert message in str(err.value)


def test_cli_run(tiny_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    path = write_suite(tmp_path, tiny_model, SUITE.replace("seeds = 1", "seedz = 1"))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: {path}: unknown key 'seedz'")
    result = runner.invoke(app, ["run", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output


PROBING_SUITE = """
name = "tiny_probing"
out = "runs/probing"

[model]
name = "tiny"
path = "{model}"

[probe]
tasks = ["toy_a.txt", "toy_b.txt"]
max_length = 32
"""


def test_probing_suite_without_finetuning(tiny_model: Path, tmp_path: Path) -> None:
    path = write_suite(tmp_path, tiny_model, PROBING_SUITE)
    run = run_suite(path, progress=False)
    assert statuses(run) == {
        ("extract", "tiny"): "ran",
        ("probe", "tiny"): "ran",
        ("report", str(tmp_path / "runs" / "probing" / "report")): "ran",
    }
    results = load_results(tmp_path / "runs" / "probing" / "results" / "tiny")
    assert set(results["task"]) == {"toy_a", "toy_b"} and sorted(results["layer"].unique()) == [0, 1, 2]
    report = tmp_path / "runs" / "probing" / "report"
    assert (report / "figures" / "heatmap.png").is_file() and not (report / "deltas.csv").exists()
    assert set(statuses(run_suite(path, progress=False)).values()) == {"skipped"}

    # a [compare] table needs the [finetune] settings
    path.write_text(path.read_text() + '\n[compare]\nvariants = ["drop-layers"]\ndrop = 1\n')
    with pytest.raises(DataError, match=r"\[compare\] needs a \[finetune\] table"):
        load_suite(path)

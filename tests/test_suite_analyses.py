"""Suite tables for the other analyses: [mlm] and [offramp] run on the pre-trained model, land in the report, resume,
and their keys are the analyses' own options (a bad one is named in the file's words)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probekit.errors import DataError
from probekit.results import load_results, validate
from probekit.suite import load_suite, run_suite
from tests.helpers import toy_senteval
from tests.test_offramp import toy_sst2

SUITE = """
name = "tiny_tour"
out = "runs/tour"
data_dir = "data"
threads = 1

[model]
name = "tiny"
path = "{model}"

[probe]
tasks = ["toy_a.txt"]
max_length = 32

[mlm]
corpus = ["toy_a.txt"]
corpus_format = "task"
steps = 2
batch_size = 8
max_length = 32

[offramp]
tasks = ["sst2"]
policies = "entropy,patience"
epochs = 1
measure = false
"""


def test_mlm_and_offramp_tables_run_resume_and_reach_the_report(tiny_model: Path, tmp_path: Path) -> None:
    toy_senteval(tmp_path / "toy_a.txt", seed=1)
    toy_sst2(tmp_path / "data", n_train=40, n_dev=12)
    path = tmp_path / "tour.toml"
    path.write_text(SUITE.format(model=tiny_model), encoding="utf-8")
    run = run_suite(path, progress=False)
    assert [(s.step, s.status) for s in run.steps] == [
        ("extract", "ran"),
        ("probe", "ran"),
        ("mlm", "ran"),
        ("offramp", "ran"),
        ("report", "ran"),
    ]
    study = tmp_path / "runs" / "tour"
    mlm = load_results(study / "mlm" / "tiny")
    validate(mlm)
    assert set(mlm["source"]) == {"mlm-probe"} and sorted(mlm["layer"].dropna().unique()) == [0, 1, 2]
    settings = json.loads(mlm["settings"].iloc[0])
    assert settings["steps"] == 2 and settings["batch_size"] == 8 and settings["max_length"] == 32  # the table's keys
    ramps = load_results(study / "offramp" / "sst2" / "frozen")
    validate(ramps)
    assert set(ramps["mode"]) == {"frozen"} and set(ramps["policy"].dropna()) == {"entropy", "patience"}
    page = (study / "report" / "index.html").read_text(encoding="utf-8")
    assert "<h2>MLM-head probe</h2>" in page and "<h2>Off-ramps and early exit</h2>" in page
    assert set(run.results["source"]) >= {"probe", "mlm-probe", "offramp", "exit-policy"}
    again = run_suite(path, progress=False)
    assert {s.status for s in again.steps} == {"skipped"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("steps = 2", "steps = 0"), "[mlm] steps must be >= 1, got 0"),
        (("steps = 2", "stepz = 2"), "unknown key 'stepz' in [mlm]"),
        (("epochs = 1", "epochs = 'one'"), "[offramp]: epochs must be a int, not 'one'"),
        (('tasks = ["sst2"]', 'tasks = ["sst2"]\nmodes = ["frozn"]'), "did you mean 'frozen'"),
    ],
)
def test_bad_analysis_keys_are_named_in_the_files_words(
    tiny_model: Path, tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    toy_senteval(tmp_path / "toy_a.txt", seed=1)
    path = tmp_path / "tour.toml"
    path.write_text(SUITE.format(model=tiny_model).replace(*edit), encoding="utf-8")
    with pytest.raises(DataError, match=r"tour\.toml") as err:
        load_suite(path)
    assert message in str(err.value)

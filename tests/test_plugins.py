"""A plugin outside the package (tests/plugin_example.py) adds a probe kind, an exit policy, a fine-tuning variant
and a suite step, one place each; they then appear in the CLI's --help, in the suite schema, and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probekit.finetune import Grid, finetune
from probekit.finetune.variants import VARIANTS, encoder_layers
from probekit.offramp.policies import EXIT_POLICIES
from probekit.plugins import load_plugins
from probekit.probes import PROBE_KINDS
from probekit.results import load_results, validate
from probekit.suite import STEPS, load_suite, run_suite
from tests.helpers import make_tiny_bert, toy_senteval
from tests.test_finetune import write_cola
from tests.test_offramp import toy_sst2

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "tests.plugin_example"


def probekit_with_plugin(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROBEKIT_PLUGINS": PLUGIN, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "probekit", *args], capture_output=True, text=True, env=env)


def test_plugin_components_appear_in_every_help() -> None:
    probe = probekit_with_plugin("probe", "--help")
    assert probe.returncode == 0, probe.stderr
    assert (
        "test-centroid" in probe.stdout and "--metric-power" in probe.stdout and "Power of the distance" in probe.stdout
    )
    offramp = probekit_with_plugin("offramp", "--help")
    assert "margin" in offramp.stdout and "--min-layer" in offramp.stdout
    ft = probekit_with_plugin("finetune", "--help")
    assert "reinit-top" in ft.stdout and "--reinit" in ft.stdout
    # and its options are validated where they are declared, rendered as flags
    bad = probekit_with_plugin(
        "finetune", "-m", "x", "-t", "cola", "-o", "/tmp/none", "--variant", "reinit-top", "--reinit", "0"
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --reinit: must be >= 1, got 0"]


SUITE = """
name = "plugin_study"
out = "runs/study"
data_dir = "data"
threads = 1
plugins = ["tests.plugin_example"]

[model]
name = "tiny"
path = "{model}"

[probe]
tasks = ["toy_a.txt"]
max_length = 32
kind = "test-centroid"
metric_power = 1.0

[offramp]
tasks = ["sst2"]
policies = "margin,entropy"
min_layer = 2
epochs = 1
measure = false

[peaks]
metric = "acc"
"""


def test_plugin_components_run_from_a_suite(tiny_model: Path, tmp_path: Path) -> None:
    toy_senteval(tmp_path / "toy_a.txt", seed=1)
    toy_sst2(tmp_path / "data", n_train=40, n_dev=12)
    path = tmp_path / "study.toml"
    path.write_text(SUITE.format(model=tiny_model), encoding="utf-8")
    suite = load_suite(path)
    assert list(suite.steps) == ["probe", "offramp", "peaks", "report"]  # the plugin's step in its place
    run = run_suite(path, progress=False)
    assert {(s.step, s.status) for s in run.steps} >= {("probe", "ran"), ("offramp", "ran"), ("peaks", "ran")}
    study = tmp_path / "runs" / "study"
    probe = load_results(study / "results" / "tiny")
    validate(probe)
    assert set(probe["probe"]) == {"test-centroid"} and json.loads(probe["settings"].iloc[0])["metric_power"] == 1.0
    # the plugin step's output agrees with the probe rows themselves: the test-accuracy argmax per task
    acc = probe[(probe["metric"] == "acc") & (probe["split"] == "test")].groupby("layer")["value"].mean()
    peaks = json.loads((study / "peaks.json").read_text())
    assert peaks == {"tiny/toy_a": int(acc.idxmax())}
    ramps = load_results(study / "offramp" / "sst2" / "frozen")
    margin = ramps[(ramps["policy"] == "margin") & (ramps["metric"] == "exit_fraction")]
    assert len(margin) and np.allclose(margin[margin["layer"] < 2]["value"], 0.0)  # min_layer = 2: nobody exits at 1
    assert (tmp_path / "runs" / "study" / "report" / "index.html").is_file()


def test_plugin_variant_fine_tunes(tmp_path: Path) -> None:
    load_plugins([PLUGIN])
    assert {"test-centroid" in PROBE_KINDS, "margin" in EXIT_POLICIES, "reinit-top" in VARIANTS, "peaks" in STEPS} == {
        True
    }
    model = make_tiny_bert(tmp_path / "tiny3", layers=3)
    data = write_cola(tmp_path / "data")
    run = finetune(
        model,
        "cola",
        tmp_path / "ft",
        seeds=1,
        grid=Grid((16,), (1e-3,), 1),
        variants=["reinit-top"],
        reinit=2,
        data_dir=data,
        max_steps=1,
        max_train_samples=16,
        max_dev_samples=8,
        threads=1,
    )
    validate(run.results)
    assert set(run.results["mode"]) == {"reinit-top-k2"} and run.seeds[0].path.is_dir()


def test_reinit_top_reinitialises_only_the_top_blocks(tmp_path: Path) -> None:
    load_plugins([PLUGIN])
    from transformers import AutoModelForSequenceClassification

    path = make_tiny_bert(tmp_path / "tiny3", layers=3)
    before = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    after = VARIANTS.get("reinit-top")(reinit=1).apply(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), seed=0
    )
    old, new = encoder_layers(before), encoder_layers(after)
    for i in range(2):
        for (_, a), (_, b) in zip(old[i].named_parameters(), new[i].named_parameters(), strict=True):
            assert np.array_equal(a.detach().numpy(), b.detach().numpy())
    changed = [
        not np.array_equal(a.detach().numpy(), b.detach().numpy())
        for a, b in zip(old[2].parameters(), new[2].parameters(), strict=True)
    ]
    assert any(changed)


@pytest.fixture(autouse=True, scope="module")
def _plugins_loaded() -> None:
    load_plugins([PLUGIN])

"""Off-ramps on the real encoder (MiniLM) and the shared SST-2 and CoLA samples (skipped without them).

Small and frozen: a few hundred training examples, so it stays fast; the assertions are about
structure and sane ranges, not exact numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekit import load_results
from probekit.cli import app
from probekit.offramp import run_offramp

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_minilm_sst2_through_the_cli(minilm: Path, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sst2"
    result = CliRunner().invoke(
        app,
        [
            "offramp",
            "--model",
            str(minilm),
            "--name",
            "minilm",
            "--task",
            "SST-2",
            "--data-dir",
            str(shared_data),
            "--out",
            str(out),
            "--train-n",
            "1000",
            "--dev-n",
            "200",
            "--time-n",
            "24",
            "--time-thresholds",
            "1",
            "--policies",
            "entropy,patience,lte,qexit",
            "--figures",
            str(tmp_path / "figs"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    df = load_results(out)
    layers = df[df["source"] == "offramp"].set_index("layer")["value"]
    assert list(layers.index) == [1, 2, 3, 4, 5, 6]
    # well above chance (0.5): frozen MiniLM's first token reaches about 0.76 with 18k examples
    assert layers[6] > 0.65 and layers.max() > 0.7
    pol = df[(df["source"] == "exit-policy") & (df["metric"] == "acc")]
    assert set(pol["policy"]) == {"entropy", "patience", "lte", "qexit"}
    assert pol["value"].between(0.4, 1.0).all()
    assert pol["expected_saving"].between(0, 5 / 6).all()
    # the no-exit end of each sweep reproduces the last layer
    ent = pol[pol["policy"] == "entropy"].sort_values("threshold")
    assert ent["value"].iloc[0] == pytest.approx(layers[6])
    assert ent["expected_saving"].iloc[0] == 0.0
    assert pol["measured_saving"].notna().sum() >= 4
    assert (tmp_path / "figs" / "offramp_sst2_minilm_frozen_exits.png").is_file()


def test_minilm_cola_reports_matthews_correlation(minilm: Path, shared_data: Path, tmp_path: Path) -> None:
    run = run_offramp(
        minilm,
        "cola",
        tmp_path / "cola",
        data_dir=shared_data,
        train_n=500,
        dev_n=200,
        policy_names="confidence,patience",
        measure=False,
        progress=False,
    )
    df = run.results
    layers = df[df["source"] == "offramp"]
    assert set(layers["metric"]) == {"mcc"} and len(layers) == 6
    assert layers["value"].between(-1, 1).all()
    pol = df[(df["source"] == "exit-policy") & (df["metric"] != "exit_fraction")]
    assert set(pol["metric"]) == {"mcc"} and "measured_saving" not in pol  # not timed

"""The "which fine-tuning method forgets least" study: a tiny suite whose [compare] methods are also extracted and
probed; the report shows their deltas and the per-method figure, and a second run does no work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from probekit import load_results
from probekit.analysis import probe_rows
from probekit.suite import run_suite
from tests.test_suite import SUITE, assert_second_run_does_nothing, statuses, write_suite

STUDY = SUITE.replace(
    '[compare]\nvariants = ["drop-layers"]\ndrop = 1',
    '[compare]\nvariants = ["smart", "siamese", "copy-layers", "drop-layers"]\ncopy_from = 1\ndrop = 1\nlambda_s = 3',
)


def test_the_study_probes_every_method_and_reports_who_forgets_least(
    tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    path = write_suite(tmp_path, tiny_model, STUDY)
    run = run_suite(path, progress=False)
    got = statuses(run)
    for model in ("tiny-cola-smart-l3-s0", "tiny-cola-copy-layers-k1-s0"):
        assert got[("extract", model)] == "ran" and got[("probe", model)] == "ran"
    assert ("extract", "tiny-cola-drop-layers-n1-s0") not in got  # fewer layers: the comparison table only
    assert got[("compare", "cola/siamese")] == "skipped"  # a pair architecture: not for CoLA
    report = tmp_path / "reports" / "study"
    assert (report / "figures" / "forgetting.png").is_file()
    table = pd.read_csv(report / "forgetting.csv")
    assert set(table["method"]) == {"plain", "smart-l3", "copy-layers-k1"} and set(table["finetune_task"]) == {"cola"}
    # the mean absolute delta per layer, from the probe results themselves
    study = tmp_path / "runs" / "study"
    base = probe_rows(load_results(study / "results" / "tiny"), "test", "acc")
    base = base.groupby(["task", "layer"])["value"].mean()
    for method, model in [("smart-l3", "tiny-cola-smart-l3-s0"), ("copy-layers-k1", "tiny-cola-copy-layers-k1-s0")]:
        tuned = probe_rows(load_results(study / "results" / model), "test", "acc").groupby(["task", "layer"])["value"]
        by_hand = (tuned.mean() - base).abs().groupby("layer").mean()
        mine = table[table["method"] == method].set_index("layer")["mean_abs_delta"]
        np.testing.assert_allclose(mine.sort_index().to_numpy(), by_hand.sort_index().to_numpy(), atol=1e-12)
    deltas = pd.read_csv(report / "method_deltas.csv")
    assert set(deltas["method"]) == {"plain", "smart-l3", "copy-layers-k1"}
    assert "Which fine-tuning method forgets least?" in (report / "index.html").read_text()
    assert "convexity_by_method.csv" in {p.name for p in report.iterdir()}
    assert "| smart-l3 |" in (report / "finetune.md").read_text()

    assert_second_run_does_nothing(path, monkeypatch)

"""Paired bootstrap tests of the convexity claim against hand computations and the large-sample normal
approximation; Holm by hand; the per-sentence predictions the probe runner stores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

import probekit
from probekit import extract, stats
from probekit.probes.predictions import Predictions, load_predictions, save_predictions
from probekit.report import build_report
from tests.helpers import make_tiny_bert, toy_senteval


def discordant(m_sent: int, n10: int, n01: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two layers on ``m_sent`` sentences: ``n10`` right only for a, ``n01`` right only for b,
    the rest split between both right and both wrong; in random positions."""
    rng = np.random.default_rng(seed)
    kinds = np.array([1] * n10 + [2] * n01 + [3] * ((m_sent - n10 - n01) // 2))
    kinds = np.concatenate([kinds, np.zeros(m_sent - len(kinds), dtype=int)])
    rng.shuffle(kinds)
    return np.isin(kinds, (1, 3)), np.isin(kinds, (2, 3))


def test_paired_bootstrap_matches_the_hand_computation_and_the_normal_approximation() -> None:
    m_sent, n10, n01 = 2000, 130, 50  # the last layer is wrong on exactly 80 more sentences than the peak
    a, b = discordant(m_sent, n10, n01)
    res = stats.paired_bootstrap(a, b, n_boot=20_000, seed=1)
    drop = (n10 - n01) / m_sent
    assert res["diff"] == pytest.approx(drop, abs=1e-12)
    se = math.sqrt(((n10 + n01) / m_sent - drop**2) / m_sent)  # sd of d_i in {-1, 0, 1}, over sqrt(M)
    assert res["se"] == pytest.approx(se, rel=0.05)
    assert res["ci_low"] == pytest.approx(drop - 1.96 * se, abs=0.2 * se)
    assert res["ci_high"] == pytest.approx(drop + 1.96 * se, abs=0.2 * se)
    p_normal = 2 * norm.sf(drop / se)  # z = 6: p is at the bootstrap's floor, 2 / (B + 1)
    assert p_normal < 1e-8 and res["p"] == pytest.approx(2 / 20_001)
    # a drop of about 2 standard errors: p near 0.05 by the normal approximation
    a, b = discordant(m_sent, 72, 50, seed=2)
    res = stats.paired_bootstrap(a, b, n_boot=20_000, seed=3)
    drop, se = 22 / m_sent, math.sqrt((122 / m_sent - (22 / m_sent) ** 2) / m_sent)
    assert res["p"] == pytest.approx(2 * norm.sf(drop / se), abs=0.015)


def test_a_drop_of_zero_has_p_close_to_one() -> None:
    a, b = discordant(1500, 60, 60)
    res = stats.paired_bootstrap(a, b, n_boot=5000)
    assert res["diff"] == 0 and res["p"] > 0.9 and res["ci_low"] < 0 < res["ci_high"]


def test_holm_by_hand() -> None:
    assert np.allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.allclose(stats.holm([0.5, 0.001]), [0.5, 0.002])
    assert np.isnan(stats.holm([np.nan, 0.2])[0])


def curve(task: str, seed: int, peak: int, gap: int, m_sent: int = 1500, layers: int = 4) -> Predictions:
    """A made-up fit: every layer right on a base set; the ``peak`` layer on ``gap`` sentences more."""
    rng = np.random.default_rng([seed, len(task)])
    base = rng.random(m_sent) < 0.6
    correct = {}
    for split in ("dev", "test"):
        c = np.tile(base, (layers, 1))
        extra = np.flatnonzero(~base)[:gap]
        c[peak, extra] = True
        correct[split] = c
    return Predictions("m", task, "linear", "mean", seed, "k", "sha-" + task, list(range(layers)), correct)


def test_convexity_tests_combine_seeds_and_correct_across_tasks() -> None:
    preds = [curve("drop", s, peak=1, gap=90 + 10 * s) for s in range(2)] + [curve("flat", 0, peak=3, gap=0)]
    table = stats.convexity_tests(preds, n_boot=4000).set_index("task")
    drop = table.loc["drop"]
    assert drop["peak_layer"] == 1 and drop["seeds"] == 2 and drop["peak_on"] == "dev"
    assert drop["drop"] == pytest.approx((90 + 100) / 2 / 1500)  # the seed-mean drop
    assert drop["ci_low"] > 0 and drop["significant"] and drop["peak_share"] > 0.99
    assert drop["p_holm"] == pytest.approx(min(1, 2 * drop["p"]))  # two tasks, the smaller p doubled
    flat = table.loc["flat"]
    assert flat["drop"] == 0 and not flat["significant"] and flat["p"] == 1.0
    assert sum(drop["argmax_share"].values()) == pytest.approx(1.0)


def test_delta_tests_pair_the_same_sentences() -> None:
    pt = [curve("t", 0, peak=2, gap=0)]
    ft = [curve("t", 0, peak=2, gap=75)]
    ft[0].model = "m-cola"
    d = stats.delta_tests(ft, pt, n_boot=4000).set_index("layer")
    assert d.loc[2, "delta"] == pytest.approx(75 / 1500) and d.loc[2, "significant"]
    assert (d.drop(index=2)["delta"] == 0).all() and (d.drop(index=2)["p"] == 1.0).all()


def test_predictions_round_trip_and_the_runner_stores_them(tiny_model: Path, tmp_path: Path) -> None:
    tiny_cache = extract(tiny_model, [toy_senteval(tmp_path / "toy.txt", n=(60, 24, 30))], out=tmp_path / "c",
                         progress=False)[0].path  # fmt: skip
    pred = curve("x", 3, peak=1, gap=7, m_sent=37)  # not a multiple of 8: packed bits must be cut
    path = save_predictions(tmp_path / "r", pred)
    back = load_predictions(path)[0]
    assert back.seed == 3 and back.layers == pred.layers and back.pool == "mean"
    assert all(np.array_equal(back.correct[s], pred.correct[s]) for s in ("dev", "test"))
    run = probekit.probe(tiny_cache, seeds=2, device="cpu", out=tmp_path / "probe", progress=False)
    preds = load_predictions(tmp_path / "probe")
    assert sorted(p.seed for p in preds) == [0, 1]
    acc = run.results[(run.results["metric"] == "acc") & (run.results["split"] == "test")]
    for p in preds:
        want = acc[acc["seed"] == p.seed].sort_values("layer")["value"].to_numpy()
        assert np.allclose(p.accuracy("test"), want)
    assert len(stats.convexity_tests(preds, n_boot=200)) == 1


def test_report_shows_paired_deltas_against_a_baseline(tiny_model: Path, tmp_path: Path) -> None:
    data = toy_senteval(tmp_path / "toy.txt", n=(60, 24, 30))
    other = make_tiny_bert(tmp_path / "other", seed=7)  # a second "model" on the same sentences
    for name, model in (("base", tiny_model), ("tuned", other)):
        extract(model, [data], out=tmp_path / "c", name=name, progress=False)
        probekit.probe(tmp_path / "c" / name, device="cpu", out=tmp_path / name, progress=False)
    report = build_report(tmp_path / "tuned", tmp_path / "report", baseline=tmp_path / "base")
    assert {"deltas", "deltas-paired", "convexity-paired"} <= set(
        json.loads((report / "report.json").read_text())["sections"]
    )
    table = pd.read_csv(report / "deltas-paired.csv")
    assert set(table["model"]) == {"tuned"} and set(table["baseline"]) == {"base"} and len(table) == 3
    base, tuned = (load_predictions(tmp_path / n)[0].correct["test"].mean(1) for n in ("base", "tuned"))
    assert np.allclose(table.sort_values("layer")["delta"], tuned - base)

"""probekit.analysis against hand-computed values; also the synthetic results the report tests use."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from probekit import analysis
from probekit.errors import ProbekitError
from probekit.results import tidy

# ---------------------------------------------------------------------------------------------
# Synthetic results in the vocabulary of probekit.results (shared with test_report/test_notebook)
# ---------------------------------------------------------------------------------------------

TASKS = ("sentence_length", "tree_depth", "bigram_shift", "odd_man_out")
PEAK_AT = {"sentence_length": 0.2, "tree_depth": 0.5, "bigram_shift": 0.7, "odd_man_out": 1.0}
"""Relative depth of each task's planted peak (1.0 = last layer: no convexity)."""


def wilson(p: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def synthetic_probe(
    model: str = "bert",
    tasks: tuple[str, ...] = TASKS,
    layers: int = 6,
    seeds: tuple[int, ...] = (0, 1, 2),
    splits: tuple[str, ...] = ("dev", "test"),
    n: int = 2000,
    finetune_task: str | None = None,
    shift: float = 0.0,
    probe: str = "linear",
    pool: str = "mean",
    data: str = "d0",
    noise: float = 0.004,
    rng: int = 0,
) -> pd.DataFrame:
    """Convex probe curves (peak at ``PEAK_AT`` of the depth) with seeds, Wilson intervals and baselines.

    ``shift`` > 0 makes a "fine-tuned" variant: upper layers lose up to ``shift`` on the odd tasks
    and gain on the even ones.
    """
    gen = np.random.default_rng(rng)
    rows = []
    for t, task in enumerate(tasks):
        peak_layer = round(PEAK_AT.get(task, (t + 1) / len(tasks)) * layers)
        top, majority = 0.92 - 0.3 * t / max(1, len(tasks) - 1), 0.5 if t % 2 else 1 / 6
        for layer in range(layers + 1):
            clean = top - 0.35 * ((layer - peak_layer) / layers) ** 2
            clean += (1 if t % 2 == 0 else -1) * shift * (layer / layers) ** 2
            for seed in seeds:
                acc = float(np.clip(clean + gen.normal(0, noise), 0.01, 0.99))
                control = majority + 0.3 * (acc - majority) + gen.normal(0, noise)
                for split in splits:
                    lo, hi = wilson(acc, n)
                    base = {
                        "model": model,
                        "task": task,
                        "layer": layer,
                        "split": split,
                        "source": "probe",
                        "model_fingerprint": f"fp-{model}",
                        "probe": probe,
                        "seed": seed,
                        "n": n,
                        "pool": pool,
                        "max_length": 128,
                        "data_sha256": f"{data}-{task}",
                        "settings": {"n_train": 10 * n},
                    }
                    if finetune_task:
                        base["finetune_task"] = finetune_task
                    rows += [
                        {**base, "metric": "acc", "value": acc, "ci_low": lo, "ci_high": hi, "reg": 1.0},
                        {**base, "metric": "control_acc", "value": control},
                        {**base, "metric": "control_gap", "value": acc - control},
                        {**base, "metric": "majority_acc", "value": majority},
                    ]
    return tidy(rows)


def synthetic_mlm(models: tuple[str, ...] = ("bert",), layers: int = 6) -> pd.DataFrame:
    rows = []
    for m, model in enumerate(models):
        for layer in range(layers + 1):
            acc = 0.05 + 0.5 * (layer / layers) ** 3 - 0.03 * m
            for metric, v in (("mlm_acc", acc), ("mlm_top5", min(0.99, acc * 1.6))):
                rows.append(
                    {
                        "model": model,
                        "task": "wikitext",
                        "layer": layer,
                        "split": "heldout",
                        "metric": metric,
                        "value": v,
                        "source": "mlm-probe",
                        "probe": "mlm-head",
                        "seed": 0,
                        "n": 5000,
                    }
                )
    return tidy(rows)


def synthetic_offramp(model: str = "bert", layers: int = 6, task: str = "sst2") -> pd.DataFrame:
    rows = []
    for mode, gap in (("frozen", 0.06), ("joint", 0.02)):
        for layer in range(1, layers + 1):
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "layer": layer,
                    "split": "dev",
                    "metric": "acc",
                    "value": 0.92 - gap * (layers - layer) / 2,
                    "source": "offramp",
                    "probe": mode,
                    "seed": 0,
                    "n": 872,
                }
            )
    for policy, bonus in (("entropy", 0.0), ("patience", 0.01)):
        for threshold in (0.1, 0.2, 0.3, 0.4, 0.5):
            saving = threshold * 1.2
            base = {
                "model": model,
                "task": task,
                "split": "dev",
                "source": "exit-policy",
                "probe": "joint",
                "policy": policy,
                "threshold": threshold,
                "n": 872,
            }
            rows.append(
                {
                    **base,
                    "layer": -1,
                    "metric": "acc",
                    "value": 0.92 - 0.1 * saving**2 + bonus,
                    "mean_exit_layer": layers * (1 - saving),
                    "expected_saving": saving,
                    "measured_saving": saving * 0.85,
                }
            )
            weights = np.exp(-np.arange(1, layers + 1) * (1 - threshold) * 1.5)
            weights = weights[::-1] if policy == "patience" else weights
            for layer, frac in enumerate(weights / weights.sum(), start=1):
                rows.append({**base, "layer": layer, "metric": "exit_fraction", "value": float(frac)})
    return tidy(rows)


def study(tmp_path, layers: int = 6, tasks: tuple[str, ...] = TASKS, extras: bool = True) -> dict[str, object]:
    """A pre-trained model and fine-tuned variants saved as results folders, as a study would produce."""
    from probekit.results import save_results

    pre = synthetic_probe("bert", tasks, layers)
    if extras:
        pre = pd.concat([pre, synthetic_mlm(("bert",), layers), synthetic_offramp("bert", layers)], ignore_index=True)
    fts = {
        "bert-cola": synthetic_probe("bert-cola", tasks, layers, finetune_task="cola", shift=0.08, rng=1),
        "bert-sst2": synthetic_probe("bert-sst2", tasks, layers, finetune_task="sst2", shift=-0.05, rng=2),
    }
    paths = {"bert": save_results(pre, tmp_path / "results" / "bert")}
    for name, df in fts.items():
        paths[name] = save_results(df, tmp_path / "results" / name)
    return paths


# ---------------------------------------------------------------------------------------------
# Hand-made tables
# ---------------------------------------------------------------------------------------------


def table(values: dict, model: str = "m", ci: dict | None = None, seeds: dict | None = None, **extra) -> pd.DataFrame:
    """``values``: {task: [acc per layer]} (one seed), or with ``seeds`` {task: {seed: [acc per layer]}}."""
    rows = []
    curves = seeds or {t: {0: v} for t, v in values.items()}
    for task, per_seed in curves.items():
        for seed, accs in per_seed.items():
            for layer, acc in enumerate(accs):
                lo, hi = (ci or {}).get(task, {}).get(layer, (None, None))
                rows.append(
                    {
                        "model": model,
                        "task": task,
                        "layer": layer,
                        "split": "test",
                        "metric": "acc",
                        "value": acc,
                        "ci_low": lo,
                        "ci_high": hi,
                        "seed": seed,
                        "source": "probe",
                        "probe": "linear",
                        "pool": "mean",
                        "max_length": 128,
                        "data_sha256": f"sha-{task}",
                        **extra,
                    }
                )
    return tidy(rows)


def by_task(df: pd.DataFrame) -> dict[str, dict]:
    return {r["task"]: r for r in df.to_dict("records")}


def test_convexity_peak_drop_and_wilson_significance():
    ci = {"a": {1: (0.77, 0.83), 3: (0.66, 0.74)}, "b": {1: (0.70, 0.88), 3: (0.62, 0.78)}}
    res = by_task(analysis.convexity(table({"a": [0.60, 0.80, 0.75, 0.70], "b": [0.60, 0.80, 0.75, 0.70]}, ci=ci)))
    a = res["a"]
    assert (a["peak_layer"], a["layers"]) == (1, 3)
    assert a["peak"] == pytest.approx(0.80) and a["last"] == pytest.approx(0.70)
    assert a["drop"] == pytest.approx(0.10)
    assert a["uncertainty"] == pytest.approx((0.80 - 0.77) + (0.74 - 0.70))  # 0.07: intervals do not overlap
    assert a["significant"] is True and a["basis"] == "wilson"
    assert res["b"]["uncertainty"] == pytest.approx(0.10 + 0.08)  # wide intervals overlap: not real
    assert res["b"]["significant"] is False


def test_convexity_seed_spread_uses_t_interval():
    seeds = {"a": {0: [0.5, 0.80, 0.75], 1: [0.5, 0.82, 0.76], 2: [0.5, 0.78, 0.74]}}
    row = by_task(analysis.convexity(table({}, seeds=seeds)))["a"]
    drops = np.array([0.05, 0.06, 0.04])
    assert row["peak_layer"] == 1 and row["seeds"] == 3
    assert row["peak"] == pytest.approx(0.80) and row["drop"] == pytest.approx(0.05)
    t975_df2 = 4.302652729911275
    assert row["uncertainty"] == pytest.approx(t975_df2 * drops.std(ddof=1) / math.sqrt(3))  # 0.0248
    assert row["significant"] is True and row["basis"] == "seeds"
    noisy = {"a": {0: [0.5, 0.80, 0.70], 1: [0.5, 0.81, 0.80], 2: [0.5, 0.79, 0.80]}}
    assert by_task(analysis.convexity(table({}, seeds=noisy)))["a"]["significant"] is False


def test_convexity_edge_cases():
    res = by_task(analysis.convexity(table({"up": [0.5, 0.6, 0.7], "tie": [0.5, 0.7, 0.7, 0.6], "flat": [0.6, 0.6]})))
    assert res["up"]["peak_layer"] == 2 and res["up"]["drop"] == 0 and res["up"]["significant"] is False
    assert res["tie"]["peak_layer"] == 1  # earliest of tied layers
    assert res["tie"]["drop"] == pytest.approx(0.1)
    assert pd.isna(res["tie"]["significant"]) and res["tie"]["basis"] == "none"  # no interval, one seed
    assert res["flat"]["peak_layer"] == 0 and res["flat"]["drop"] == 0


def test_convexity_recovers_planted_peaks():
    res = analysis.convexity(synthetic_probe(layers=10, noise=0.001))
    got = dict(zip(res["task"], res["peak_layer"], strict=True))
    assert got == {t: round(PEAK_AT[t] * 10) for t in TASKS}
    sig = dict(zip(res["task"], res["significant"], strict=True))
    assert sig["sentence_length"] and not sig["odd_man_out"]
    assert set(res["split"]) == {"test"}  # test preferred over dev


def test_convexity_refuses_mixed_data_and_checkpoints():
    mixed = pd.concat([table({"a": [0.5, 0.6]}), table({"a": [0.5, 0.6]}, data_sha256="other")])
    with pytest.raises(ProbekitError, match="different data"):
        analysis.convexity(mixed)
    two = pd.concat([table({"a": [0.5, 0.6]}, model_fingerprint="x"), table({"a": [0.5, 0.6]}, model_fingerprint="y")])
    with pytest.raises(ProbekitError, match="different checkpoints"):
        analysis.convexity(two)
    with pytest.raises(ProbekitError, match="no probe results"):
        analysis.convexity(synthetic_mlm())


def test_seed_summary_means_and_spread():
    seeds = {"a": {0: [0.5, 0.8], 1: [0.7, 0.6]}}
    s = analysis.seed_summary(table({}, seeds=seeds)).set_index("layer")
    assert s.loc[0, "value"] == pytest.approx(0.6) and s.loc[1, "value"] == pytest.approx(0.7)
    assert s.loc[0, "sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1)) and s.loc[0, "seeds"] == 2


def test_deltas_match_on_seed_and_layer():
    pre = table({}, model="pre", seeds={"a": {0: [0.5, 0.8, 0.7], 1: [0.6, 0.8, 0.8]}})
    ft = table({}, model="ft", seeds={"a": {0: [0.5, 0.7, 0.6], 1: [0.6, 0.9, 0.5], 2: [0.0, 0.0, 0.0]}})
    d = analysis.deltas(ft, pre, finetune_tasks={"ft": "cola"}).set_index("layer")
    assert list(d.index) == [0, 1, 2] and set(d["model"]) == {"ft"} and set(d["baseline"]) == {"pre"}
    assert d.loc[1, "delta"] == pytest.approx(((0.7 - 0.8) + (0.9 - 0.8)) / 2)  # seed 2 has no partner
    assert d.loc[2, "delta"] == pytest.approx(((0.6 - 0.7) + (0.5 - 0.8)) / 2)
    assert d.loc[2, "delta_sd"] == pytest.approx(np.std([-0.1, -0.3], ddof=1))
    assert d.loc[2, "finetuned"] == pytest.approx(0.55) and d.loc[2, "pretrained"] == pytest.approx(0.75)
    assert set(d["seeds"]) == {2} and set(d["finetune_task"]) == {"cola"}


def test_deltas_finetune_task_from_column_or_unknown_and_baseline_skipped():
    pre = table({"a": [0.5, 0.6]}, model="pre")
    ft = table({"a": [0.6, 0.6], "b": [0.1, 0.1]}, model="ft", finetune_task="rte")
    d = analysis.deltas(pd.concat([pre, ft]), pre)  # the baseline among the fine-tuned rows is ignored
    assert set(d["model"]) == {"ft"} and set(d["finetune_task"]) == {"rte"}
    assert set(d["task"]) == {"a"}  # b is not in the baseline
    assert list(d["delta"]) == pytest.approx([0.1, 0.0])
    plain = analysis.deltas(table({"a": [0.6, 0.6]}, model="ft"), pre)  # never parsed from the name
    assert plain["finetune_task"].isna().all()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"probe": "mlp"}, "probe=mlp"),
        ({"pool": "cls"}, "pool=cls"),
        ({"max_length": 64}, "max_length=64"),
        ({"data_sha256": "other"}, "data_sha256=other"),
    ],
)
def test_deltas_refuse_mismatched_settings(change, match):
    pre = table({"a": [0.5, 0.6]}, model="pre")
    ft = table({"a": [0.6, 0.6]}, model="ft").assign(**change)
    with pytest.raises(ProbekitError, match=f"cannot compare 'ft'.*{match}"):
        analysis.deltas(ft, pre)


def test_deltas_refuse_other_layers_seeds_and_bad_baselines():
    pre = table({"a": [0.5, 0.6]}, model="pre")
    with pytest.raises(ProbekitError, match="layers"):
        analysis.deltas(table({"a": [0.5, 0.6, 0.7]}, model="ft"), pre)
    with pytest.raises(ProbekitError, match="no common probe seed"):
        analysis.deltas(table({}, model="ft", seeds={"a": {5: [0.5, 0.6]}}), pre)
    # seeds are compared per probe: the baseline's linear seed 1 does not pair with an mlp seed 1
    pre2 = table({}, model="pre", seeds={"a": {0: [0.5, 0.6], 1: [0.5, 0.6]}})
    pre2 = pd.concat([pre2, table({"a": [0.5, 0.6]}, model="pre", probe="mlp")])
    ft2 = table({"a": [0.6, 0.7]}, model="ft")
    ft2 = pd.concat([ft2, table({}, model="ft", seeds={"a": {1: [0.5, 0.6]}}, probe="mlp")])
    with pytest.raises(ProbekitError, match="no common probe seed"):
        analysis.deltas(ft2, pre2)
    with pytest.raises(ProbekitError, match="one model"):
        analysis.deltas(table({"a": [0.5, 0.6]}, model="ft"), pd.concat([pre, table({"a": [0.5, 0.6]}, model="x")]))
    with pytest.raises(ProbekitError, match="share no task"):
        analysis.deltas(table({"z": [0.5, 0.6]}, model="ft"), pre)
    with pytest.raises(ProbekitError, match="other than the baseline"):
        analysis.deltas(pre, pre)


def test_finetune_grid_averages_models_and_top_layers():
    pre = table({"a": [0.5, 0.5, 0.5, 0.5]}, model="pre")
    ft1 = table({"a": [0.5, 0.6, 0.7, 0.8]}, model="ft1")
    ft2 = table({"a": [0.5, 0.5, 0.5, 0.6]}, model="ft2")
    ft3 = table({"a": [0.4, 0.4, 0.4, 0.4]}, model="ft3")
    d = analysis.deltas(pd.concat([ft1, ft2, ft3]), pre, finetune_tasks={"ft1": "cola", "ft2": "cola", "ft3": "sst2"})
    grid = analysis.finetune_grid(d, top=2).set_index("finetune_task")
    assert grid.loc["cola", "delta"] == pytest.approx(((0.2 + 0.3) / 2 + (0.0 + 0.1) / 2) / 2)
    assert grid.loc["cola", "models"] == 2 and grid.loc["cola", "layer"] == "top 2"
    assert grid.loc["sst2", "delta"] == pytest.approx(-0.1)
    per_layer = analysis.finetune_grid(d)
    assert len(per_layer) == 8
    one = per_layer[(per_layer["finetune_task"] == "cola") & (per_layer["layer"] == 3)]
    assert one["delta"].item() == pytest.approx(0.2)

"""Layerwise probes: a planted signal, agreement with scikit-learn on real MiniLM features, the
MLP on a non-linear signal, baselines and intervals, determinism, bad input and the command."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probekit
from probekit import LayerCache, LayerwiseProbe, extract, load_results
from probekit.cli import app
from probekit.errors import CacheError, ProbekitError
from probekit.probes import wilson
from probekit.probes.table import layer_table
from tests.helpers import toy_senteval

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU

runner = CliRunner()
GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def planted(n: int, layers: int, dim: int, signal_layer: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian noise on every layer; only ``signal_layer`` separates the two classes (linearly)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, layers, dim)) + rng.normal(size=(1, layers, dim))  # offsets: not centred
    direction = rng.normal(size=dim)
    x[:, signal_layer] += np.outer(2 * y - 1, 2.0 * direction / np.linalg.norm(direction))
    return x.astype(np.float16), y


def splits(x: np.ndarray, y: np.ndarray, n_train: int, n_dev: int) -> tuple[np.ndarray, ...]:
    a, b = n_train, n_train + n_dev
    return x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:]


# ---------------------------------------------------------------- faithfulness


def test_planted_signal_is_found_at_its_layer_and_nowhere_else() -> None:
    x, y = planted(1500, layers=5, dim=32, signal_layer=3)
    xtr, ytr, xdv, ydv, xte, yte = splits(x, y, 700, 300)
    lp = LayerwiseProbe(kind="linear", seed=0, device="cpu").fit(xtr, ytr, xdv, ydv)
    acc = lp.score(xte, yte)
    control = lp.score(xte, yte, control=True)
    assert int(np.argmax(acc)) == 3
    assert acc[3] >= 0.95
    assert np.all(np.abs(np.delete(acc, 3) - 0.5) < 0.1), acc
    assert np.all(np.abs(control - 0.5) < 0.1), control  # shuffled labels: chance everywhere
    assert lp.best_reg_.shape == (5,) and set(lp.best_reg_) <= set(GRID)
    assert lp.dev_scores_.shape == (5, 2, len(GRID))


def sklearn_protocol(cache: LayerCache) -> np.ndarray:
    """SentEval's CPU protocol with scikit-learn, per layer: C on dev, accuracy on test."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(1):
        for layer in range(cache.n_layers):
            xtr, xdv, xte = (np.asarray(cache[s, layer], dtype=np.float32) for s in ("train", "dev", "test"))
            best = (-1.0, 0.0)
            for c in GRID:
                clf = LogisticRegression(C=c, max_iter=5000).fit(xtr, cache.labels("train"))
                dev = clf.score(xdv, cache.labels("dev"))
                if dev > best[0]:
                    best = (dev, clf.score(xte, cache.labels("test")))
            out.append(best[1])
    return np.array(out)


@pytest.fixture(scope="session")
def minilm_caches(minilm: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[LayerCache]:
    out = tmp_path_factory.mktemp("minilm-caches")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two threads on a shared 2-core machine
    try:
        return extract(minilm, ["bigram_shift", "past_present"], out=out, data_dir=shared_data, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_agrees_with_sklearn_on_real_minilm_features(minilm_caches: list[LayerCache]) -> None:
    results = probekit.probe(minilm_caches, seeds=1, device="cpu", control=False, progress=False).results
    for cache in minilm_caches:
        rows = results[(results["task"] == cache.task) & (results["split"] == "test") & (results["metric"] == "acc")]
        ours = rows.sort_values("layer")["value"].to_numpy()
        theirs = sklearn_protocol(cache)
        diff = 100 * np.abs(ours - theirs)
        assert len(ours) == cache.n_layers == 7
        print(f"{cache.task}: mean |diff| {diff.mean():.2f} points, max {diff.max():.2f}")
        assert diff.mean() <= 1.0 and diff.max() <= 2.5, (cache.task, ours, theirs)


def test_mlp_learns_a_nonlinear_signal_the_linear_probe_cannot() -> None:
    rng = np.random.default_rng(1)
    n = 1600
    a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    y = (a * b > 0).astype(int)  # XOR of the two signs
    x = rng.normal(scale=0.3, size=(n, 2, 8))
    x[:, 1, 0] += 2 * a
    x[:, 1, 1] += 2 * b
    xtr, ytr, xdv, ydv, xte, yte = splits(x.astype(np.float32), y, 1000, 300)
    linear = LayerwiseProbe(kind="linear", device="cpu", control=False).fit(xtr, ytr, xdv, ydv).score(xte, yte)
    mlp = LayerwiseProbe(kind="mlp", device="cpu", control=False, max_epoch=60).fit(xtr, ytr, xdv, ydv)
    acc = mlp.score(xte, yte)
    assert linear[1] < 0.65 and acc[0] < 0.65  # layer 0 is noise for both
    assert acc[1] >= 0.9, acc
    assert mlp.best_reg_.shape == (2,) and set(mlp.best_reg_) <= {1e-5, 1e-4, 1e-3, 1e-2}


# ---------------------------------------------------------------- baselines and intervals


def test_wilson_interval_matches_scipy() -> None:
    from scipy.stats import binomtest

    for k, n in [(0, 10), (3, 10), (50, 100), (686, 686), (412, 686), (1, 3)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson(k, n)
        assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)


@pytest.fixture(scope="module")
def tiny_cache_master(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny-cache")
    data = toy_senteval(tmp / "toy.txt", n=(60, 24, 30), labels=("O", "I", "O"))  # unbalanced: 2/3 O
    [cache] = extract(tiny_model, [data], out=tmp / "caches", progress=False)
    return cache.path


@pytest.fixture
def tiny_cache(tiny_cache_master: Path, tmp_path: Path) -> Path:
    """A private copy of a tiny real cache (3 layers x 32), free to break."""
    path = tmp_path / "caches" / tiny_cache_master.parent.name / tiny_cache_master.name
    shutil.copytree(tiny_cache_master, path)
    return path


def test_rows_baselines_and_control_gap(tiny_cache: Path) -> None:
    df = probekit.probe(tiny_cache, seeds=2, device="cpu", progress=False).results
    cache = LayerCache.open(tiny_cache)
    assert set(df["source"]) == {"probe"} and set(df["probe"]) == {"linear"}
    assert set(df["split"]) == {"dev", "test"} and set(df["layer"]) == {0, 1, 2} and set(df["seed"]) == {0, 1}
    assert set(df["metric"]) == {"acc", "control_acc", "control_gap", "majority_acc"}
    assert len(df) == 2 * 3 * 2 * 4  # seeds x layers x splits x metrics
    assert (df["model"] == cache.model).all() and (
        df["model_fingerprint"] == cache.manifest["model"]["fingerprint"]
    ).all()
    assert (df["data_sha256"] == cache.manifest["data"]["sha256"]).all() and (df["pool"] == "mean").all()
    ytr = np.asarray(cache.labels("train"))
    majority = np.bincount(ytr).argmax()
    for split in ("dev", "test"):
        y = np.asarray(cache.labels(split))
        rows = df[df["split"] == split]
        assert (rows["n"] == len(y)).all()
        maj = rows[rows["metric"] == "majority_acc"]
        assert np.allclose(maj["value"], (y == majority).sum() / len(y))
        wide = rows.pivot_table(index=["seed", "layer"], columns="metric", values="value")
        assert np.allclose(wide["control_gap"], wide["acc"] - wide["control_acc"])
        acc = rows[rows["metric"] == "acc"]
        low, high = wilson(np.round(acc["value"] * len(y)), len(y))
        assert np.allclose(acc["ci_low"], low) and np.allclose(acc["ci_high"], high)
        assert acc["reg"].isin(GRID).all()
    assert rows[rows["metric"] == "control_gap"]["ci_low"].isna().all()


def test_same_seed_same_numbers_and_seed_summary(tiny_cache: Path) -> None:
    a = probekit.probe(tiny_cache, seeds=2, device="cpu", progress=False).results
    b = probekit.probe(tiny_cache, seeds=2, device="cpu", progress=False).results
    pd.testing.assert_frame_equal(a, b)
    control = a[(a["metric"] == "control_acc") & (a["split"] == "dev")].pivot_table(
        index="layer", columns="seed", values="value"
    )
    table = layer_table(a)
    assert [r["layer"] for r in table] == ["0", "1", "2", "majority"]
    assert all("±" in r[a["task"].iloc[0]] for r in table)
    assert control.shape == (3, 2)


def test_mlp_is_deterministic_too(tiny_cache: Path) -> None:
    with pytest.warns(UserWarning, match="mlp probe fit.* stopped at the limit .* raise --max-epoch"):
        a = probekit.probe(tiny_cache, kind="mlp", device="cpu", progress=False, max_epoch=8).results
    with pytest.warns(UserWarning, match="stopped at the limit"):
        b = probekit.probe(tiny_cache, kind="mlp", device="cpu", progress=False, max_epoch=8).results
    pd.testing.assert_frame_equal(a, b)
    assert set(a["probe"]) == {"mlp"} and a[a["metric"] == "acc"]["reg"].isin([1e-5, 1e-4, 1e-3, 1e-2]).all()


# ---------------------------------------------------------------- bad input


def _rewrite(path: Path, fname: str, fn) -> None:  # type: ignore[no-untyped-def]
    arr = np.load(path / fname)
    np.save(path / fname, fn(arr.copy()))


def test_missing_incomplete_and_incompatible_caches(tiny_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        probekit.probe(tmp_path / "nope", progress=False)
    (tiny_cache / "dev.features.npy").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        probekit.probe(tiny_cache, progress=False)
    partial = tiny_cache.with_name(tiny_cache.name + ".partial")
    tiny_cache.rename(partial)
    with pytest.raises(CacheError, match="no probekit cache found|incomplete"):
        probekit.probe(partial.parent, progress=False)
    partial.rename(tiny_cache)
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    manifest["version"] = 0
    (tiny_cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="incompatible"):
        probekit.probe(tiny_cache, progress=False)


def test_one_class_is_an_error_naming_the_task(tiny_cache: Path) -> None:
    _rewrite(tiny_cache, "train.labels.npy", lambda y: np.zeros_like(y))
    with pytest.raises(ProbekitError, match=r"toy .*same label"):
        probekit.probe(tiny_cache, progress=False)


def test_empty_split_is_an_error(tiny_cache: Path) -> None:
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    manifest["splits"]["test"]["n"] = manifest["splits"]["test"]["n_tokens"] = 0
    (tiny_cache / "manifest.json").write_text(json.dumps(manifest))
    _rewrite(tiny_cache, "test.features.npy", lambda x: x[:0])
    _rewrite(tiny_cache, "test.labels.npy", lambda y: y[:0])
    with pytest.raises(ProbekitError, match="toy .*test split has no rows"):
        probekit.probe(tiny_cache, progress=False)


def test_nonfinite_features_warn_naming_task_and_layer_and_are_left_out(tiny_cache: Path) -> None:
    def overflow(x: np.ndarray) -> np.ndarray:
        x[5, 1, 3] = np.inf  # as an fp16 overflow would leave it
        return x

    _rewrite(tiny_cache, "train.features.npy", overflow)
    with pytest.warns(UserWarning, match=r"toy: layer\(s\) \[1\] have NaN/inf"):
        df = probekit.probe(tiny_cache, device="cpu", progress=False).results
    assert set(df["layer"]) == {0, 2} and np.isfinite(df["value"]).all()
    _rewrite(tiny_cache, "dev.features.npy", lambda x: np.full_like(x, np.nan))
    with pytest.raises(ProbekitError, match="every layer has NaN/inf"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probekit.probe(tiny_cache, device="cpu", progress=False)


def test_layerwise_probe_refuses_nonfinite_and_single_class() -> None:
    x, y = planted(300, layers=2, dim=8, signal_layer=0)
    x = x.astype(np.float32)
    x[0, 1, 0] = np.nan
    with pytest.raises(ProbekitError, match=r"train features hold NaN or inf at layer\(s\) \[1\]"):
        LayerwiseProbe(device="cpu").fit(x[:200], y[:200], x[200:], y[200:])
    lp = LayerwiseProbe(device="cpu").fit(x[:200], y[:200], x[200:], y[200:], layers=[0])
    assert lp.score(x[200:], y[200:]).shape == (1,)
    with pytest.raises(ProbekitError, match="single class"):
        LayerwiseProbe(device="cpu").fit(x[:200], np.zeros(200, int), x[200:], y[200:], layers=[0])


def test_token_level_caches_are_refused(tiny_model: Path, toy_task: Path, tmp_path: Path) -> None:
    [cache] = extract(tiny_model, [toy_task], out=tmp_path, pool="tokens", progress=False)
    with pytest.raises(CacheError, match="token-level"):
        probekit.probe(cache.path, progress=False)


# ---------------------------------------------------------------- command line and resume


def test_cli_end_to_end(tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = runner.invoke(app, ["probe", str(tiny_cache.parent.parent), "--out", str(out), "--seeds", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "toy" in result.output and "majority" in result.output and "test accuracy" in result.output
    assert (out / "results.parquet").is_file() and (out / "results.csv").is_file()
    df = load_results(out)
    assert len(df) == 2 * 3 * 2 * 4 and set(df["source"]) == {"probe"}
    assert load_results(out / "results.csv")["value"].tolist() == pytest.approx(df["value"].tolist())
    result = runner.invoke(app, ["probe", str(tiny_cache), "--out", str(out), "--probe", "mlp", "-q"])
    assert result.exit_code == 0, result.output
    assert set(load_results(out)["probe"]) == {"linear", "mlp"}  # earlier rows kept


def test_cli_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["probe", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cache directory") and "does not exist" in lines[0]


def test_resume_skips_fits_already_done(tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results"
    first = probekit.probe(tiny_cache, seeds=1, device="cpu", out=out, progress=False).results

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("refitted")

    monkeypatch.setattr(LayerwiseProbe, "fit", fail)
    again = probekit.probe(tiny_cache, seeds=1, device="cpu", out=out, progress=False).results
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    with pytest.raises(AssertionError, match="refitted"):  # other settings: fitted again
        probekit.probe(tiny_cache, seeds=1, device="cpu", out=out, progress=False, grid=[1.0])
    assert len(load_results(out)) == len(first)

"""The MDL probe (online codelength, Voita & Titov 2020) against a plain per-layer, per-block loop written
here (SciPy's L-BFGS-B on scikit-learn's objective), a planted signal and the uniform code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from typer.testing import CliRunner

import probekit
from probekit import LayerwiseProbe, extract
from probekit.cli import app
from probekit.errors import ParamError
from probekit.probes.mdl import FRACTIONS, ORDER_SEED, block_ends
from probekit.report import build_report
from probekit.results import validate
from tests.helpers import toy_senteval

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU


def planted(n: int, layers: int = 3, dim: int = 6, k: int = 2, signal: int = 1, seed: int = 0):
    """Noise on every layer; only layer ``signal`` separates the ``k`` classes (well-separated means)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, layers, dim))
    means = rng.normal(size=(k, dim))
    means *= 3.0 / np.linalg.norm(means, axis=1, keepdims=True)
    x[:, signal] += means[y]
    return x.astype(np.float32), y


def nll_bits(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """-log2 p(y | x) summed, for a binary (w [D], b scalar) or softmax (w [K, D], b [K]) model."""
    if w.ndim == 1:
        z = x @ w + b
        return float(np.sum(np.logaddexp(0, z) - y * z) / math.log(2))
    z = x @ w.T + b
    return float(np.sum(logsumexp(z, axis=1) - z[np.arange(len(y)), y]) / math.log(2))


def sklearn_objective_fit(x: np.ndarray, y: np.ndarray, k: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """argmin C sum(logloss) + ||W||^2 / 2 (intercept unpenalised): scikit-learn's LogisticRegression objective,
    which also accepts a prefix holding one class only."""
    d = x.shape[1]
    kk = 1 if k == 2 else k

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: kk * d].reshape(kk, d), theta[kk * d :]
        z = x @ w.T + b
        if kk == 1:
            z1 = z[:, 0]
            loss = np.sum(np.logaddexp(0, z1) - y * z1)
            r = (1 / (1 + np.exp(-z1)) - y)[:, None]
        else:
            lse = logsumexp(z, axis=1)
            loss = np.sum(lse - z[np.arange(len(y)), y])
            r = np.exp(z - lse[:, None])
            r[np.arange(len(y)), y] -= 1
        gw = c * (r.T @ x) + w
        gb = c * r.sum(0)
        return c * loss + 0.5 * np.sum(w**2), np.concatenate([gw.ravel(), gb])

    res = minimize(f, np.zeros(kk * (d + 1)), jac=True, method="L-BFGS-B", options={"gtol": 1e-9, "maxiter": 5000})
    w, b = res.x[: kk * d].reshape(kk, d), res.x[kk * d :]
    return (w[0], b[0]) if kk == 1 else (w, b)


def loop_codelength(x, y, xd, yd, k: int, grid: tuple[float, ...], seed: int) -> np.ndarray:
    """The online codelength per layer, one layer and one block at a time; per block the C of lowest dev loss."""
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED + seed)).numpy()
    ends = block_ends(n, FRACTIONS)
    out = []
    for layer in range(x.shape[1]):
        bits = ends[0] * math.log2(k)
        for i, t in enumerate(ends[:-1]):
            prefix, block = order[:t], order[t : ends[i + 1]]
            if len(set(y[prefix])) < k:  # no optimum on a prefix without every class: the uniform code
                bits += len(block) * math.log2(k)
                continue
            fits = [sklearn_objective_fit(x[prefix, layer], y[prefix], k, c) for c in grid]
            dev = [nll_bits(w, b, xd[:, layer], yd) for w, b in fits]
            w, b = fits[int(np.argmin(dev))]
            bits += nll_bits(w, b, x[block, layer], y[block])
        out.append(bits)
    return np.array(out)


@pytest.mark.parametrize("k", [2, 3])
def test_online_codelength_equals_a_plain_per_layer_per_block_loop(k: int) -> None:
    x, y = planted(400, k=k, seed=k)
    grid = (0.5, 4.0)
    lp = LayerwiseProbe(kind="mdl", grid=grid, seed=1, device="cpu").fit(x[:300], y[:300], x[300:], y[300:])
    got = lp.estimator_.codelength_[:, 0]
    want = loop_codelength(x[:300].astype(np.float64), y[:300], x[300:].astype(np.float64), y[300:], k, grid, 1)
    assert np.allclose(got, want, rtol=0.005), (got, want)
    # the control: the same loop on the permuted labels the layerwise probe uses
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1)).numpy()
    control = loop_codelength(x[:300].astype(np.float64), y[:300][perm], x[300:], y[300:], k, grid, 1)
    assert np.allclose(lp.estimator_.codelength_[:, 1], control, rtol=0.005)


def test_planted_signal_compresses_only_its_layer_and_shuffled_labels_do_not() -> None:
    x, y = planted(1200, layers=4, signal=2)
    lp = LayerwiseProbe(kind="mdl", device="cpu").fit(x[:800], y[:800], x[800:1000], y[800:1000])
    est = lp.estimator_
    comp, control = est.compression_[:, 0], est.compression_[:, 1]
    assert int(np.argmax(comp)) == 2 and comp[2] > 3, comp
    assert np.all(np.abs(np.delete(comp, 2) - 1) < 0.15), comp  # no compression without the signal
    assert np.all(np.abs(control - 1) < 0.15), control  # shuffled labels: nothing to learn
    assert est.uniform_codelength_ == pytest.approx(800 * math.log2(2))
    acc = lp.score(x[1000:], y[1000:])  # accuracy of the full-train probe, as every kind reports
    assert int(np.argmax(acc)) == 2 and acc[2] > 0.9


def test_block_ends_and_option_errors() -> None:
    assert block_ends(1000) == [1, 2, 4, 8, 16, 32, 62, 125, 250, 500, 1000]  # floor(N f / 100)
    assert block_ends(100) == [1, 3, 6, 12, 25, 50, 100]  # at least 1, strictly increasing
    with pytest.raises(ParamError, match="fractions"):
        LayerwiseProbe(kind="mdl", fractions=(10, 50)).settings()


@pytest.fixture(scope="module")
def three_class_cache(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mdl")
    data = toy_senteval(tmp / "gamma.txt", n=(90, 24, 30), seed=3, labels=("A", "B", "C"))
    return extract(tiny_model, [data], out=tmp / "caches", progress=False)[0].path


def test_runner_and_cli_write_codelength_rows(three_class_cache: Path, tmp_path: Path) -> None:
    run = probekit.probe(three_class_cache, kind="mdl", device="cpu", out=tmp_path / "api", progress=False)
    df = run.results
    validate(df)
    train = df[df["split"] == "train"]
    assert set(train["metric"]) == {
        "codelength",
        "uniform_codelength",
        "compression",
        "control_codelength",
        "control_compression",
    }
    assert np.allclose(train.loc[train["metric"] == "uniform_codelength", "value"], 90 * math.log2(3))
    wide = train.pivot_table(index="layer", columns="metric", values="value")
    assert np.allclose(wide["compression"], wide["uniform_codelength"] / wide["codelength"])
    assert set(df.loc[df["split"] == "test", "metric"]) == {"acc", "control_acc", "control_gap", "majority_acc"}
    result = CliRunner().invoke(app, ["probe", str(three_class_cache), "--out", str(tmp_path / "cli"),
                                      "--probe", "mdl", "--grid", "1", "-q"], env={"COLUMNS": "80"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MDL compression" in result.output and max(map(len, result.output.splitlines())) <= 80
    cli = probekit.load_results(tmp_path / "cli")
    assert (cli.loc[cli["split"] == "train", "metric"] == "compression").sum() == 3  # 3 layers of the tiny model
    report = build_report(tmp_path / "cli", tmp_path / "report")
    sections = json.loads((report / "report.json").read_text())["sections"]
    assert {"mdl", "convexity-paired", "probing"} <= set(sections)
    assert (report / "figures" / "mdl-compression-heatmap.png").is_file()
    summary = (report / "summary.md").read_text()
    assert "tasks drop significantly" in summary and "peak layer by compression" in summary

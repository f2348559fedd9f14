"""The MDL probe (online codelength, Voita & Titov 2020) against a plain per-layer, per-block loop written
here (SciPy's L-BFGS-B on scikit-learn's objective), a planted signal and the uniform code."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from typer.testing import CliRunner

import probekit
from probekit import LayerwiseProbe, extract
from probekit.analysis import probe_rows
from probekit.cli import app
from probekit.errors import ConvergenceWarning, ParamError
from probekit.probes.mdl import FRACTIONS, ORDER_SEED, block_ends
from probekit.probes.protocols import SENTEVAL_MLP
from probekit.report import build_report
from probekit.results import validate
from tests.helpers import run_probe_suite, senteval_classifier, toy_senteval

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


# ---------------------------------------------------------------- MDL with a protocol's classifier (SentEval's MLP)


def senteval_block_loop(x, y, xd, yd, k: int, grid, fractions, order: np.ndarray) -> np.ndarray:
    """Online codelength per layer with SentEval's classifier as the block probe: for each prefix of the
    transmission order, SentEval's training on the prefix's rows (in SentEval's row order) per L2 value, the
    block's bits under the L2 value of lowest dev log loss; a prefix lacking a class sends the uniform code."""
    n = len(y)
    sent = torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED + 0)).numpy()
    ends = block_ends(n, fractions)
    nll = lambda m, a, b: float(torch.nn.functional.cross_entropy(m(a), b, reduction="sum")) / math.log(2)  # noqa: E731
    out = []
    for layer in range(x.shape[1]):
        t_ = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        bits = ends[0] * math.log2(k)
        for i, t in enumerate(ends[:-1]):
            prefix, block = sent[:t], sent[t : ends[i + 1]]
            if len(set(y[prefix])) < k:
                bits += len(block) * math.log2(k)
                continue
            rows = order[np.isin(order, prefix)]
            xp, yp, xdl = t_(x[rows, layer]), t_(y[rows]), t_(xd[:, layer])
            fits = [senteval_classifier(xp, yp, xdl, t_(yd), l2, k)[1] for l2 in grid]
            with torch.no_grad():
                dev = [nll(m, xdl, t_(yd)) for m in fits]
                bits += nll(fits[int(np.argmin(dev))], t_(x[block, layer]), t_(y[block]))
        out.append(bits)
    return np.array(out)


def test_mdl_with_senteval_block_probes_equals_a_plain_loop_of_senteval_classifiers() -> None:
    x, y = planted(900, layers=2, dim=8, k=3, signal=1, seed=4)
    order = np.random.default_rng(5).permutation(600)  # SentEval's row order of train
    grid, fractions = (1e-4, 1e-2), (5.0, 12.5, 25.0, 50.0, 100.0)
    cand = {**SENTEVAL_MLP, "nhid": 0, "grid": grid}
    lp = LayerwiseProbe(kind="mdl", block_probe="mlp", block_options=(cand,), fractions=fractions,
                        control=False, seed=0, device="cpu")  # fmt: skip
    lp.fit(x[:600], y[:600], x[600:], y[600:], order=order)
    want = senteval_block_loop(x[:600], y[:600], x[600:], y[600:], 3, grid, fractions, order)
    got = lp.estimator_.codelength_[:, 0]
    assert np.allclose(got, want, rtol=0.01), (got, want)
    assert got[1] < 0.5 * got[0]  # the planted layer needs far fewer bits
    # its accuracy is the protocol's own full-train fit: the same as the plain senteval classifier
    plain = LayerwiseProbe(kind="mlp", control=False, device="cpu", **cand).fit(x[:600], y[:600], x[600:], y[600:],
                                                                                order=order)  # fmt: skip
    assert np.array_equal(lp.predict(x[600:]), plain.predict(x[600:]))


def test_mdl_runs_with_a_protocol_from_the_api_the_cli_and_a_suite(
    three_class_cache: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mdl = probekit.probe(three_class_cache, kind="mdl", protocol="senteval", max_epoch=8, device="cpu",
                             out=tmp_path / "mdl", progress=False).results  # fmt: skip
        acc = probekit.probe(three_class_cache, protocol="senteval", max_epoch=8, device="cpu",
                             out=tmp_path / "acc", progress=False).results  # fmt: skip
    validate(mdl)
    assert set(mdl["protocol"]) == {"senteval"} and set(mdl["probe"]) == {"mdl"}
    key = ["layer", "metric"]
    test_rows = lambda df: df[df["split"] == "test"].set_index(key)["value"].sort_index()  # noqa: E731
    pd.testing.assert_series_equal(test_rows(mdl).loc[:, ["acc"], :], test_rows(acc).loc[:, ["acc"], :])
    assert (mdl.loc[mdl["split"] == "train", "metric"] == "compression").sum() == 3
    assert set(probe_rows(mdl)["probe"]) == {"mdl-senteval"}  # its curves are named apart from senteval's
    result = CliRunner().invoke(app, ["probe", str(three_class_cache), "-o", str(tmp_path / "cli"), "--probe", "mdl",
                                      "--protocol", "senteval", "--max-epoch", "8", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MDL compression" in result.output
    cli = probekit.load_results(tmp_path / "cli")
    np.testing.assert_allclose(
        cli[cli["metric"] == "codelength"].sort_values("layer")["value"],
        mdl[mdl["metric"] == "codelength"].sort_values("layer")["value"],
    )
    report = build_report(tmp_path / "cli", tmp_path / "report")
    assert "mdl" in json.loads((report / "report.json").read_text())["sections"]
    rows = run_probe_suite(tmp_path, tiny_model, 'kind = "mdl"\nprotocol = "senteval"\nmax_epoch = 8\n')
    assert set(rows["probe"]) == {"mdl"} and set(rows["protocol"]) == {"senteval"}
    assert "compression" in set(rows["metric"])
